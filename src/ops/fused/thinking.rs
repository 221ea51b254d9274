//! The thinking layer's own element-wise ops (DESIGN §3; `model/thinking.rs`), each one graph
//! node with its backward pass, in place of chains of candle's broadcast products, gathers and
//! reductions (`itt bench` with candle's backward timed per op showed the router's D -> 1
//! product and the phi_1 scaling at ~0.7 ms and ~2 ms a call in backward at 2048 x 256):
//! - [`router_logits`]: R(x) = x w^T + b, a dot product per row.
//! - [`scale_columns`]: x * phi, step 1's `phi_1 * f(x0)`.
//! - [`routed_update`]: a routed step's `x[S] += (y * phi) * w`.
//! - [`gather_rows`]: `x[S]`, the selected rows (candle's `index_select` runs on one thread, and
//!   its backward copies the whole summed gradient of x to add the rows in).
//!
//! Each has a composed twin in `ops::composed` (test oracle, and the path for other dtypes and
//! devices); sums over rows go by fixed chunks added in order, so results do not depend on the
//! thread count.
//!
//! ## routed_update
//! The state update of a routed thinking step, residual thinking connection in its literal form:
//!
//! ```text
//! out = x;  out[idx[r]] += (y[r] * phi) * w[r]     for the M selected rows r
//! ```
//! x (N, D) the state, y (M, D) the block's output on the selected rows, phi (D,) the step
//! encoding, w (M,) their router weights, idx (M,) distinct rows of x (held by the op).
//! phi and w travel packed as one vector [phi; w] because a custom op takes at most three
//! tensors; `Tensor::cat`'s backward splits the gradient again.
//!
//! Backward, g = dL/dout (N, D), a[r] = g[idx[r]] * w[r]:
//! dx = g;  dy[r] = a[r] * phi;  dphi = sum_r a[r] * y[r];  dw[r] = sum_d g[idx[r], d] * y[r, d] * phi[d].
//!
//! Composed twin (`composed::routed_update`): `x.index_add(idx, (y * phi) * w)`, whose forward
//! and dy this op reproduces bit for bit (same products in the same order); dphi and dw are
//! sums in another order. It replaces ten nodes (two broadcast products, the scatter, and the
//! backward's gathers, products and reductions over (M, D) temporaries).

use super::shell::{Grad, Kernel, Shell};
use super::{dot, for_row_chunks, Filled, Real};
use crate::{Error, Result};
use candle_core::{Shape, Tensor};

struct RoutedUpdate {
    idx: Vec<u32>,
    /// [`row_slots`] of idx.
    slot: Vec<u32>,
}

/// One pass over the rows of x on every thread: each output row is x's row, plus the update
/// where the row was selected (a copy of x followed by a scatter was ~0.5 ms a call at
/// 2048 x 256, the copy on one thread).
fn forward<T: Real>(slot: &[u32], x: &[T], y: &[T], pw: &[T], d: usize) -> Vec<T> {
    let (phi, w) = pw.split_at(d);
    let n = x.len() / d;
    let mut out = Filled::new(x.len());
    let po = out.ptr();
    for_row_chunks(n, d, |rows| {
        // SAFETY: each chunk writes only its own rows.
        let oc = unsafe { po.slice(rows.start * d, rows.len() * d) };
        for (o, i) in oc.chunks_exact_mut(d).zip(rows) {
            let xr = &x[i * d..][..d];
            match slot[i] {
                u32::MAX => o.copy_from_slice(xr),
                r => {
                    let (r, yr) = (r as usize, &y[r as usize * d..][..d]);
                    let wr = w[r];
                    for (((o, &xv), &yv), &p) in o.iter_mut().zip(xr).zip(yr).zip(phi) {
                        *o = xv + (yv * p) * wr;
                    }
                }
            }
        }
    });
    // SAFETY: the chunks cover every row.
    unsafe { out.assume_filled() }
}

/// (dy (M, D), [dphi; dw] (D + M,)).
fn backward<T: Real>(idx: &[u32], y: &[T], pw: &[T], g: &[T], d: usize) -> (Vec<T>, Vec<T>) {
    let m = idx.len();
    let (phi, w) = pw.split_at(d);
    let mut dy = Filled::new(m * d);
    let mut dw = Filled::new(m);
    let (pdy, pdw) = (dy.ptr(), dw.ptr());
    let dphi = column_sums(m, d, |r, dphi| {
        let (gr, yr) = (&g[idx[r] as usize * d..][..d], &y[r * d..][..d]);
        // SAFETY: row r of dy and element r of dw are written by the chunk that holds r only.
        let dyr = unsafe { pdy.slice(r * d, d) };
        let wr = w[r];
        let mut dwr = T::ZERO;
        for ((((dyv, dp), &gv), &yv), &p) in dyr.iter_mut().zip(dphi.iter_mut()).zip(gr).zip(yr).zip(phi) {
            let a = gv * wr;
            *dyv = a * p;
            *dp += a * yv;
            dwr += gv * (yv * p);
        }
        // SAFETY: as above, element r of dw belongs to this chunk.
        unsafe { pdw.slice(r, 1)[0] = dwr };
    });
    // SAFETY: the chunks cover every row of dy and every element of dw.
    let (dy, dw) = unsafe { (dy.assume_filled(), dw.assume_filled()) };
    (dy, dphi.into_iter().chain(dw).collect())
}

impl Kernel<3> for RoutedUpdate {
    const NAME: &'static str = "itt-routed-update";
    const WHAT: &'static str = "routed update";

    fn forward<T: Real>(&self, [x, y, pw]: [&[T]; 3], shapes: [&Shape; 3]) -> candle_core::Result<(Vec<T>, Shape)> {
        let d = shapes[0].dims2()?.1;
        Ok((forward(&self.slot, x, y, pw, d), shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        [_, y_t, _]: [&Tensor; 3],
        [_, y, pw]: [&[T]; 3],
        _out: &[T],
        g: &[T],
    ) -> candle_core::Result<[Grad<T>; 3]> {
        let (dy, dpw) = backward(&self.idx, y, pw, g, y_t.dims2()?.1);
        // The state passes through unchanged: its gradient is g itself.
        Ok([Grad::Output, Grad::Values(dy), Grad::Values(dpw)])
    }
}

/// Fused twin of `composed::routed_update`: x (N, D) with (y * phi) * w added to rows `idx`.
/// y (M, D), phi (D,), w (M, 1) or (M,); `idx` distinct rows of x.
pub fn routed_update(x: &Tensor, idx: &[u32], y: &Tensor, phi: &Tensor, w: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    let m = idx.len();
    if y.dims() != [m, d] || phi.dims() != [d] || w.elem_count() != m {
        return Err(Error::usage(format!(
            "routed update: x {:?}, y {:?}, phi {:?}, w {:?} do not fit {m} selected rows",
            x.dims(),
            y.dims(),
            phi.dims(),
            w.dims()
        )));
    }
    // Distinct rows inside x: each row of x takes at most one update.
    let slot = row_slots("routed update", idx, n)?;
    if m == 0 {
        return Ok(x.clone());
    }
    let pw = Tensor::cat(&[phi.contiguous()?, w.flatten_all()?.contiguous()?], 0)?;
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &pw, Shell(RoutedUpdate { idx: idx.to_vec(), slot }))?)
}

/// Partial column sums of a chunk of rows, added in chunk order: `sum_r f(r)[d]` for every d.
fn column_sums<T: Real>(m: usize, d: usize, row: impl Fn(usize, &mut [T]) + Sync) -> Vec<T> {
    let parts = for_row_chunks(m, d, |rows| {
        let mut acc = vec![T::ZERO; d];
        for r in rows {
            row(r, &mut acc);
        }
        acc
    });
    let mut out = vec![T::ZERO; d];
    for part in parts {
        for (s, v) in out.iter_mut().zip(part) {
            *s += v;
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// router_logits

/// z (N, 1) = x (N, D) . w^T + b, w (1, D), b (1,).
/// Backward: dx[r] = g[r] * w;  dw = sum_r g[r] * x[r];  db = sum_r g[r].
struct RouterLogits;

fn router_forward<T: Real>(x: &[T], w: &[T], b: T, d: usize) -> Vec<T> {
    let n = x.len() / d;
    let mut z = Filled::new(n);
    let pz = z.ptr();
    for_row_chunks(n, d, |rows| {
        // SAFETY: each chunk writes only its own rows.
        let zc = unsafe { pz.slice(rows.start, rows.len()) };
        for (o, r) in zc.iter_mut().zip(rows) {
            *o = dot(&x[r * d..][..d], w) + b;
        }
    });
    // SAFETY: the chunks cover every row.
    unsafe { z.assume_filled() }
}

/// (dx (N, D), dw (D,), db).
fn router_backward<T: Real>(x: &[T], w: &[T], g: &[T], d: usize) -> (Vec<T>, Vec<T>, T) {
    let n = g.len();
    let mut dx = Filled::new(n * d);
    let pdx = dx.ptr();
    let dw = column_sums(n, d, |r, acc| {
        // SAFETY: row r of dx is written by the chunk that holds r only.
        let dxr = unsafe { pdx.slice(r * d, d) };
        let (gr, xr) = (g[r], &x[r * d..][..d]);
        for ((o, a), (&wv, &xv)) in dxr.iter_mut().zip(acc.iter_mut()).zip(w.iter().zip(xr)) {
            *o = gr * wv;
            *a += gr * xv;
        }
    });
    let db = column_sums(n, 1, |r, acc| acc[0] += g[r])[0];
    // SAFETY: the chunks cover every row of dx.
    (unsafe { dx.assume_filled() }, dw, db)
}

impl Kernel<3> for RouterLogits {
    const NAME: &'static str = "itt-router-logits";
    const WHAT: &'static str = "router logits";

    fn forward<T: Real>(&self, [x, w, b]: [&[T]; 3], shapes: [&Shape; 3]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (n, d) = shapes[0].dims2()?;
        Ok((router_forward(x, w, b[0], d), Shape::from((n, 1))))
    }

    fn backward<T: Real>(
        &self,
        [x_t, _, _]: [&Tensor; 3],
        [x, w, _]: [&[T]; 3],
        _out: &[T],
        g: &[T],
    ) -> candle_core::Result<[Grad<T>; 3]> {
        let (dx, dw, db) = router_backward(x, w, g, x_t.dims2()?.1);
        Ok([Grad::Values(dx), Grad::Values(dw), Grad::Values(vec![db])])
    }
}

/// Fused twin of `composed::router_logits`: x (N, D), w (1, D), b (1,) -> x w^T + b (N, 1).
pub fn router_logits(x: &Tensor, w: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    if w.dims() != [1, d] || b.dims() != [1] {
        return Err(Error::usage(format!(
            "router: x {:?}, weight {:?}, bias {:?} do not fit (N, D), (1, D), (1,)",
            x.dims(),
            w.dims(),
            b.dims()
        )));
    }
    if n == 0 {
        return crate::ops::composed::router_logits(x, w, b);
    }
    Ok(x.contiguous()?.apply_op3(&w.contiguous()?, &b.contiguous()?, Shell(RouterLogits))?)
}

// ---------------------------------------------------------------------------------------------
// scale_columns

/// y (N, D) = x * phi, phi (D,). Backward: dx = g * phi;  dphi = sum_r g[r] * x[r].
struct ScaleColumns;

fn scale_forward<T: Real>(x: &[T], phi: &[T]) -> Vec<T> {
    let d = phi.len();
    let mut y = Filled::new(x.len());
    let py = y.ptr();
    for_row_chunks(x.len() / d, d, |rows| {
        // SAFETY: each chunk writes only its own rows.
        let yc = unsafe { py.slice(rows.start * d, rows.len() * d) };
        for (yr, xr) in yc.chunks_exact_mut(d).zip(x[rows.start * d..rows.end * d].chunks_exact(d)) {
            for ((o, &xv), &p) in yr.iter_mut().zip(xr).zip(phi) {
                *o = xv * p;
            }
        }
    });
    // SAFETY: the chunks cover every row.
    unsafe { y.assume_filled() }
}

fn scale_backward<T: Real>(x: &[T], phi: &[T], g: &[T]) -> (Vec<T>, Vec<T>) {
    let d = phi.len();
    let mut dx = Filled::new(x.len());
    let pdx = dx.ptr();
    let dphi = column_sums(x.len() / d, d, |r, acc| {
        // SAFETY: row r of dx is written by the chunk that holds r only.
        let dxr = unsafe { pdx.slice(r * d, d) };
        let (gr, xr) = (&g[r * d..][..d], &x[r * d..][..d]);
        for (((o, a), &p), (&gv, &xv)) in dxr.iter_mut().zip(acc.iter_mut()).zip(phi).zip(gr.iter().zip(xr)) {
            *o = gv * p;
            *a += gv * xv;
        }
    });
    // SAFETY: the chunks cover every row of dx.
    (unsafe { dx.assume_filled() }, dphi)
}

impl Kernel<2> for ScaleColumns {
    const NAME: &'static str = "itt-scale-columns";
    const WHAT: &'static str = "column scaling";

    fn forward<T: Real>(&self, [x, phi]: [&[T]; 2], shapes: [&Shape; 2]) -> candle_core::Result<(Vec<T>, Shape)> {
        Ok((scale_forward(x, phi), shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        _: [&Tensor; 2],
        [x, phi]: [&[T]; 2],
        _out: &[T],
        g: &[T],
    ) -> candle_core::Result<[Grad<T>; 2]> {
        let (dx, dphi) = scale_backward(x, phi, g);
        Ok([Grad::Values(dx), Grad::Values(dphi)])
    }
}

/// Fused twin of `composed::scale_columns`: x (N, D) * phi (D,), bit-equal forward.
pub fn scale_columns(x: &Tensor, phi: &Tensor) -> Result<Tensor> {
    let (n, d) = x.dims2()?;
    if phi.dims() != [d] {
        return Err(Error::usage(format!("column scaling: x {:?} and phi {:?} do not fit", x.dims(), phi.dims())));
    }
    if n == 0 || d == 0 {
        return crate::ops::composed::scale_columns(x, phi);
    }
    Ok(x.contiguous()?.apply_op2(&phi.contiguous()?, Shell(ScaleColumns))?)
}

// ---------------------------------------------------------------------------------------------
// gather_rows

/// y (M, D) = x[idx] for distinct rows idx of x (N, D).
/// Backward: dx (N, D) = g's rows at idx, zero elsewhere.
struct GatherRows {
    idx: Vec<u32>,
    /// [`row_slots`] of idx.
    slot: Vec<u32>,
}

fn gather_forward<T: Real>(idx: &[u32], x: &[T], d: usize) -> Vec<T> {
    let mut y = Filled::new(idx.len() * d);
    let py = y.ptr();
    for_row_chunks(idx.len(), d, |rows| {
        // SAFETY: each chunk writes only its own rows.
        let yc = unsafe { py.slice(rows.start * d, rows.len() * d) };
        for (yr, r) in yc.chunks_exact_mut(d).zip(rows) {
            yr.copy_from_slice(&x[idx[r] as usize * d..][..d]);
        }
    });
    // SAFETY: the chunks cover every row.
    unsafe { y.assume_filled() }
}

fn gather_backward<T: Real>(slot: &[u32], g: &[T], d: usize) -> Vec<T> {
    let n = slot.len();
    let mut dx = Filled::new(n * d);
    let pdx = dx.ptr();
    for_row_chunks(n, d, |rows| {
        // SAFETY: each chunk writes only its own rows.
        let dc = unsafe { pdx.slice(rows.start * d, rows.len() * d) };
        for (o, i) in dc.chunks_exact_mut(d).zip(rows) {
            match slot[i] {
                u32::MAX => o.fill(T::ZERO),
                r => o.copy_from_slice(&g[r as usize * d..][..d]),
            }
        }
    });
    // SAFETY: the chunks cover every row.
    unsafe { dx.assume_filled() }
}

impl Kernel<1> for GatherRows {
    const NAME: &'static str = "itt-gather-rows";
    const WHAT: &'static str = "row gather";

    fn forward<T: Real>(&self, [x]: [&[T]; 1], shapes: [&Shape; 1]) -> candle_core::Result<(Vec<T>, Shape)> {
        let d = shapes[0].dims2()?.1;
        Ok((gather_forward(&self.idx, x, d), Shape::from((self.idx.len(), d))))
    }

    fn backward<T: Real>(
        &self,
        [x_t]: [&Tensor; 1],
        _: [&[T]; 1],
        _out: &[T],
        g: &[T],
    ) -> candle_core::Result<[Grad<T>; 1]> {
        Ok([Grad::Values(gather_backward(&self.slot, g, x_t.dims2()?.1))])
    }
}

/// Fused twin of `composed::gather_rows`: the rows `idx` of x (N, D), which must be distinct
/// (the backward pass writes each row of dx once) -> (M, D).
pub fn gather_rows(x: &Tensor, idx: &[u32]) -> Result<Tensor> {
    let (n, _) = x.dims2()?;
    let slot = row_slots("row gather", idx, n)?;
    if idx.is_empty() {
        return crate::ops::composed::gather_rows(x, idx);
    }
    Ok(x.contiguous()?.apply_op1(Shell(GatherRows { idx: idx.to_vec(), slot }))?)
}

/// For each of the n rows, the position r with idx[r] = that row, or u32::MAX where it is not
/// selected; an error unless every index is below n and none repeats (the kernels write each
/// row from one thread).
fn row_slots(what: &str, idx: &[u32], n: usize) -> Result<Vec<u32>> {
    let mut slot = vec![u32::MAX; n];
    for (r, &i) in idx.iter().enumerate() {
        let i = i as usize;
        if i >= n || std::mem::replace(&mut slot[i], r as u32) != u32::MAX {
            return Err(Error::usage(format!("{what}: row {i} repeated or outside the {n} rows")));
        }
    }
    Ok(slot)
}
