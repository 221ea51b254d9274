//! The state update of a routed thinking step (ITT-SPEC §3; `model/thinking.rs`, residual
//! thinking connection in its literal form), as one graph node:
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

use super::{for_row_chunks, with_data, Filled, Real, SharedMut};
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp3, Layout, Shape, Tensor};

struct RoutedUpdate {
    idx: Vec<u32>,
}

fn forward<T: Real>(idx: &[u32], x: &[T], y: &[T], pw: &[T], d: usize) -> Vec<T> {
    let (phi, w) = pw.split_at(d);
    let mut out = x.to_vec();
    let po = SharedMut(out.as_mut_ptr());
    for_row_chunks(idx.len(), d, |rows| {
        for r in rows {
            // SAFETY: the op's constructor checked that idx holds distinct rows < N, so each
            // output row is written by exactly one r.
            let o = unsafe { po.slice(idx[r] as usize * d, d) };
            let wr = w[r];
            for ((o, &yv), &p) in o.iter_mut().zip(&y[r * d..][..d]).zip(phi) {
                *o += (yv * p) * wr;
            }
        }
    });
    out
}

/// (dy (M, D), [dphi; dw] (D + M,)).
fn backward<T: Real>(idx: &[u32], y: &[T], pw: &[T], g: &[T], d: usize) -> (Vec<T>, Vec<T>) {
    let m = idx.len();
    let (phi, w) = pw.split_at(d);
    let mut dy = Filled::new(m * d);
    let mut dpw = vec![T::ZERO; d + m];
    let (pdy, pdw) = (dy.ptr(), SharedMut(dpw[d..].as_mut_ptr()));
    // Each chunk of rows writes its rows of dy and dw and returns its part of dphi; the parts
    // are added in chunk order, so the sum does not depend on the thread count.
    let parts = for_row_chunks(m, d, |rows| {
        let mut dphi = vec![T::ZERO; d];
        for r in rows {
            let (gr, yr) = (&g[idx[r] as usize * d..][..d], &y[r * d..][..d]);
            // SAFETY: row r of dy and element r of dw belong to this chunk only.
            let dyr = unsafe { pdy.slice(r * d, d) };
            let wr = w[r];
            let mut dw = T::ZERO;
            for ((((dyv, dp), &gv), &yv), &p) in dyr.iter_mut().zip(dphi.iter_mut()).zip(gr).zip(yr).zip(phi) {
                let a = gv * wr;
                *dyv = a * p;
                *dp += a * yv;
                dw += gv * (yv * p);
            }
            unsafe { pdw.slice(r, 1)[0] = dw };
        }
        dphi
    });
    for part in parts {
        for (s, v) in dpw[..d].iter_mut().zip(part) {
            *s += v;
        }
    }
    // SAFETY: the chunks cover every row of dy.
    (unsafe { dy.assume_filled() }, dpw)
}

impl CustomOp3 for RoutedUpdate {
    fn name(&self) -> &'static str {
        "itt-routed-update"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::cpu_data as c;
        let d = l1.shape().dims2()?.1;
        let out = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(forward::<f32>(&self.idx, c(s1, l1)?, c(s2, l2)?, c(s3, l3)?, d)),
            CpuStorage::F64(_) => CpuStorage::F64(forward::<f64>(&self.idx, c(s1, l1)?, c(s2, l2)?, c(s3, l3)?, d)),
            _ => bail!("routed update: fused kernel runs in f32 or f64"),
        };
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        pw: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            op: &RoutedUpdate,
            y: &Tensor,
            pw: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            let d = y.dims2()?.1;
            let (dy, dpw) = with_data::<T, _>(y, |yd| {
                with_data::<T, _>(pw, |pd| with_data::<T, _>(grad, |gd| Ok(backward(&op.idx, yd, pd, gd, d))))
            })?;
            Ok((Tensor::from_vec(dy, y.shape(), y.device())?, Tensor::from_vec(dpw, pw.shape(), pw.device())?))
        }
        let (dy, dpw) = match y.dtype() {
            candle_core::DType::F32 => run::<f32>(self, y, pw, grad)?,
            candle_core::DType::F64 => run::<f64>(self, y, pw, grad)?,
            dt => bail!("routed update: fused kernel runs in f32 or f64, not {dt:?}"),
        };
        // The state passes through unchanged: its gradient is g itself.
        Ok((Some(grad.clone()), Some(dy), Some(dpw)))
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
    // Distinct rows inside x: the forward pass writes rows from several threads.
    let mut seen = vec![false; n];
    for &i in idx {
        let i = i as usize;
        if i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(Error::usage(format!("routed update: row {i} repeated or outside the {n} rows of x")));
        }
    }
    if m == 0 {
        return Ok(x.clone());
    }
    let pw = Tensor::cat(&[phi.contiguous()?, w.flatten_all()?.contiguous()?], 0)?;
    Ok(x.contiguous()?.apply_op3(&y.contiguous()?, &pw, RoutedUpdate { idx: idx.to_vec() })?)
}
