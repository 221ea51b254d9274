//! Rotary embeddings, fused (rotate-half pairs (i, i + hd/2), as `composed::apply_rope`).
//! x: (N, H, hd); cos, sin: (N, hd/2), each token's own position -> y: (N, H, hd).
//! Forward: y1 = x1 cos - x2 sin, y2 = x2 cos + x1 sin (x1, x2 the halves of a head).
//! Backward (the transposed rotation): dx1 = dy1 cos + dy2 sin, dx2 = dy2 cos - dy1 sin; and,
//! only when the tables are tracked, dcos = sum_h dy1 x1 + dy2 x2, dsin = sum_h dy2 x1 - dy1 x2.

use super::shell::{Grad, Kernel, Shell};
use super::{for_row_chunks, multiversion, simd_level, Filled, Real};
use crate::{Error, Result};
use candle_core::{bail, Shape, Tensor};

multiversion! {
    /// Tokens of x (rows, H * hd) -> y; `sign` = 1 rotates forward, -1 backward (dx from dy).
    fn rotate_rows<T: Real, const FMA: bool>(x: &[T], cos: &[T], sin: &[T], h: usize, hd: usize, sign: T, y: &mut [T]) {
        let (half, width) = (hd / 2, h * hd);
        for (((xr, yr), c), s) in
            x.chunks_exact(width).zip(y.chunks_exact_mut(width)).zip(cos.chunks_exact(half)).zip(sin.chunks_exact(half))
        {
            for (xh, yh) in xr.chunks_exact(hd).zip(yr.chunks_exact_mut(hd)) {
                let (x1, x2) = xh.split_at(half);
                let (y1, y2) = yh.split_at_mut(half);
                for i in 0..half {
                    let (c, s) = (c[i], sign * s[i]);
                    y1[i] = x1[i] * c - x2[i] * s;
                    y2[i] = x2[i] * c + x1[i] * s;
                }
            }
        }
    }
}

multiversion! {
    /// Gradients of the tables for tokens (rows): dcos, dsin (rows, hd/2).
    fn table_grad_rows<T: Real, const FMA: bool>(x: &[T], dy: &[T], h: usize, hd: usize, dcos: &mut [T], dsin: &mut [T]) {
        let (half, width) = (hd / 2, h * hd);
        for (((xr, dyr), dc), ds) in
            x.chunks_exact(width).zip(dy.chunks_exact(width)).zip(dcos.chunks_exact_mut(half)).zip(dsin.chunks_exact_mut(half))
        {
            dc.fill(T::ZERO);
            ds.fill(T::ZERO);
            for (xh, dyh) in xr.chunks_exact(hd).zip(dyr.chunks_exact(hd)) {
                let (x1, x2) = xh.split_at(half);
                let (d1, d2) = dyh.split_at(half);
                for i in 0..half {
                    dc[i] += d1[i] * x1[i] + d2[i] * x2[i];
                    ds[i] += d2[i] * x1[i] - d1[i] * x2[i];
                }
            }
        }
    }
}

struct Rope {
    /// (N, H, hd)
    dims: (usize, usize, usize),
}

impl Rope {
    /// y = R x (sign 1) or dx = R^T dy (sign -1); x, y: (N, H, hd).
    fn rotate<T: Real>(&self, x: &[T], cos: &[T], sin: &[T], sign: f64) -> candle_core::Result<Vec<T>> {
        let (n, h, hd) = self.dims;
        if x.len() != n * h * hd || cos.len() != n * (hd / 2) || sin.len() != cos.len() {
            bail!("rope: sizes do not match (N, H, hd) = {:?}", self.dims);
        }
        let mut y = Filled::new(x.len());
        let py = y.ptr();
        let (simd, row, half) = (simd_level(), h * hd, hd / 2);
        for_row_chunks(n, row, |rg| {
            // SAFETY: each chunk writes only its own tokens.
            let yc = unsafe { py.slice(rg.start * row, rg.len() * row) };
            let (c, s) = (&cos[rg.start * half..rg.end * half], &sin[rg.start * half..rg.end * half]);
            rotate_rows::<T>(simd, &x[rg.start * row..rg.end * row], c, s, h, hd, T::of(sign), yc);
        });
        // SAFETY: the chunks cover every token.
        Ok(unsafe { y.assume_filled() })
    }

    fn table_grads<T: Real>(&self, x: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
        let (n, h, hd) = self.dims;
        let (row, half) = (h * hd, hd / 2);
        let (mut dcos, mut dsin) = (Filled::new(n * half), Filled::new(n * half));
        let (pc, ps) = (dcos.ptr(), dsin.ptr());
        let simd = simd_level();
        for_row_chunks(n, row, |rg| {
            // SAFETY: each chunk writes only its own tokens.
            let (dc, ds) =
                unsafe { (pc.slice(rg.start * half, rg.len() * half), ps.slice(rg.start * half, rg.len() * half)) };
            let (a, b) = (rg.start * row, rg.end * row);
            table_grad_rows::<T>(simd, &x[a..b], &dy[a..b], h, hd, dc, ds);
        });
        // SAFETY: the chunks cover every token (each row is zeroed, then summed into).
        unsafe { (dcos.assume_filled(), dsin.assume_filled()) }
    }
}

impl Kernel<3> for Rope {
    const NAME: &'static str = "itt-rope";
    const WHAT: &'static str = "rope";

    fn forward<T: Real>(&self, [x, cos, sin]: [&[T]; 3], shapes: [&Shape; 3]) -> candle_core::Result<(Vec<T>, Shape)> {
        Ok((self.rotate(x, cos, sin, 1.0)?, shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        [_, cos_t, sin_t]: [&Tensor; 3],
        [x, cos, sin]: [&[T]; 3],
        _out: &[T],
        dy: &[T],
    ) -> candle_core::Result<[Grad<T>; 3]> {
        let dx = Grad::Values(self.rotate(dy, cos, sin, -1.0)?);
        // The tables are constants in the model; their gradients only when something tracks them.
        if !cos_t.track_op() && !sin_t.track_op() {
            return Ok([dx, Grad::None, Grad::None]);
        }
        let (dc, ds) = self.table_grads(x, dy);
        Ok([dx, Grad::Values(dc), Grad::Values(ds)])
    }
}

/// Fused twin of `composed::apply_rope`. x: (N, H, hd); cos, sin: (N, hd/2) -> (N, H, hd).
pub fn apply_rope(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let (n, h, hd) = x.dims3()?;
    if hd % 2 != 0 || cos.dims() != [n, hd / 2] || sin.dims() != [n, hd / 2] {
        return Err(Error::usage(format!(
            "rope: x {:?} needs an even head size and cos, sin of ({n}, {}), got {:?}, {:?}",
            x.dims(),
            hd / 2,
            cos.dims(),
            sin.dims()
        )));
    }
    if x.elem_count() == 0 {
        return crate::ops::composed::apply_rope(x, cos, sin);
    }
    Ok(x.contiguous()?.apply_op3(&cos.contiguous()?, &sin.contiguous()?, Shell(Rope { dims: (n, h, hd) }))?)
}
