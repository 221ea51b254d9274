//! RMSNorm, fused. x: (..., D) taken as rows of D, gain: (D,) -> y like x.
//! Forward: r = 1 / sqrt(mean(x^2) + eps) per row (saved), y = x * r * gain.
//! Backward: dx = r * gain * dy - x * r^3 / D * sum(x * gain * dy);  dgain = sum_rows dy * x * r.

use super::shell::{Grad, Kernel, Shell};
use super::{dot, dot3, for_row_chunks, multiversion, simd_level, Filled, Real};
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, Shape, Tensor};
use std::sync::Mutex;

multiversion! {
    /// Rows of x (rows, d) -> rows of y, and r per row.
    fn fwd_rows<T: Real, const FMA: bool>(x: &[T], gain: &[T], d: usize, eps: T, y: &mut [T], r: &mut [T]) {
        let inv_d = T::ONE / T::of(d as f64);
        for ((xr, yr), rr) in x.chunks_exact(d).zip(y.chunks_exact_mut(d)).zip(r.iter_mut()) {
            let inv = T::ONE / (dot(xr, xr) * inv_d + eps).sqrt();
            *rr = inv;
            for ((y, &x), &g) in yr.iter_mut().zip(xr).zip(gain) {
                *y = x * inv * g;
            }
        }
    }
}

multiversion! {
    /// Rows of dx, and this chunk's part of dgain added into `dgain`.
    fn bwd_rows<T: Real, const FMA: bool>(x: &[T], gain: &[T], r: &[T], dy: &[T], d: usize, dx: &mut [T], dgain: &mut [T]) {
        let inv_d = T::ONE / T::of(d as f64);
        for (((xr, dyr), dxr), &r) in x.chunks_exact(d).zip(dy.chunks_exact(d)).zip(dx.chunks_exact_mut(d)).zip(r) {
            let coef = r * r * r * dot3(xr, gain, dyr) * inv_d;
            for ((((dx, &x), &g), &dy), dg) in dxr.iter_mut().zip(xr).zip(gain).zip(dyr).zip(dgain.iter_mut()) {
                *dx = r * g * dy - coef * x;
                *dg += dy * x * r;
            }
        }
    }
}

struct RmsNorm {
    eps: f64,
    /// r per row, saved by the forward pass.
    r: Mutex<Option<CpuStorage>>,
}

impl RmsNorm {
    /// (y, r per row).
    fn normalize<T: Real>(&self, x: &[T], gain: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let d = gain.len();
        if d == 0 || !x.len().is_multiple_of(d) {
            bail!("rms_norm: gain of {d} does not divide the input of {} elements", x.len());
        }
        let rows = x.len() / d;
        let (mut y, mut r) = (Filled::new(x.len()), Filled::new(rows));
        let (py, pr) = (y.ptr(), r.ptr());
        let (simd, eps) = (simd_level(), T::of(self.eps));
        for_row_chunks(rows, d, |rg| {
            // SAFETY: each chunk writes only its own rows.
            let (yc, rc) = unsafe { (py.slice(rg.start * d, rg.len() * d), pr.slice(rg.start, rg.len())) };
            fwd_rows::<T>(simd, &x[rg.start * d..rg.end * d], gain, d, eps, yc, rc);
        });
        // SAFETY: the chunks cover every row.
        Ok(unsafe { (y.assume_filled(), r.assume_filled()) })
    }

    /// (dx, dgain).
    fn grads<T: Real>(&self, x: &[T], gain: &[T], dy: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
        let guard = self.r.lock().unwrap();
        let Some(r) = guard.as_ref() else { bail!("rms_norm backward before its forward pass") };
        let r = T::cpu_storage_as_slice(r)?;
        let d = gain.len();
        let rows = x.len() / d;
        let mut dx = Filled::new(x.len());
        let pdx = dx.ptr();
        let simd = simd_level();
        let parts = for_row_chunks(rows, d, |rg| {
            let mut dg = vec![T::ZERO; d];
            // SAFETY: each chunk writes only its own rows.
            let dxc = unsafe { pdx.slice(rg.start * d, rg.len() * d) };
            let (a, b) = (rg.start * d, rg.end * d);
            bwd_rows::<T>(simd, &x[a..b], gain, &r[rg.clone()], &dy[a..b], d, dxc, &mut dg);
            dg
        });
        // Chunk partials summed in chunk order: the same result on any number of threads.
        let mut dgain = vec![T::ZERO; d];
        for p in parts {
            for (a, b) in dgain.iter_mut().zip(p) {
                *a += b;
            }
        }
        // SAFETY: the chunks cover every row.
        Ok((unsafe { dx.assume_filled() }, dgain))
    }
}

impl Kernel<2> for RmsNorm {
    const NAME: &'static str = "itt-rms-norm";
    const WHAT: &'static str = "rms_norm";

    fn forward<T: Real>(&self, [x, gain]: [&[T]; 2], shapes: [&Shape; 2]) -> candle_core::Result<(Vec<T>, Shape)> {
        let (y, r) = self.normalize(x, gain)?;
        *self.r.lock().unwrap() = Some(T::to_cpu_storage_owned(r));
        Ok((y, shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        _: [&Tensor; 2],
        [x, gain]: [&[T]; 2],
        _out: &[T],
        dy: &[T],
    ) -> candle_core::Result<[Grad<T>; 2]> {
        let (dx, dg) = self.grads(x, gain, dy)?;
        Ok([Grad::Values(dx), Grad::Values(dg)])
    }
}

/// Fused twin of `composed::rms_norm`. x: (..., D), gain: (D,) -> like x.
pub fn rms_norm(x: &Tensor, gain: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dims().last().copied().unwrap_or(0);
    if gain.dims() != [d] {
        return Err(Error::usage(format!("rms_norm: gain {:?} does not match input {:?}", gain.dims(), x.dims())));
    }
    if x.elem_count() == 0 {
        return crate::ops::composed::rms_norm(x, gain, eps);
    }
    Ok(x.contiguous()?.apply_op2(&gain.contiguous()?, Shell(RmsNorm { eps, r: Mutex::new(None) }))?)
}
