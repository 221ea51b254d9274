//! RMSNorm, fused. x: (..., D) taken as rows of D, gain: (D,) -> y like x.
//! Forward: r = 1 / sqrt(mean(x^2) + eps) per row (saved), y = x * r * gain.
//! Backward: dx = r * gain * dy - x * r^3 / D * sum(x * gain * dy);  dgain = sum_rows dy * x * r.

use super::{dot, dot3, for_row_chunks, multiversion, simd_level, with_data, Filled, Real};
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};
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
    fn forward<T: Real>(&self, x: &[T], gain: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
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

    fn backward<T: Real>(&self, x: &[T], gain: &[T], dy: &[T]) -> candle_core::Result<(Vec<T>, Vec<T>)> {
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

impl CustomOp2 for RmsNorm {
    fn name(&self) -> &'static str {
        "itt-rms-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::cpu_data as d;
        let (y, r) = match s1 {
            CpuStorage::F32(_) => {
                let (y, r) = self.forward::<f32>(d(s1, l1)?, d(s2, l2)?)?;
                (CpuStorage::F32(y), CpuStorage::F32(r))
            }
            CpuStorage::F64(_) => {
                let (y, r) = self.forward::<f64>(d(s1, l1)?, d(s2, l2)?)?;
                (CpuStorage::F64(y), CpuStorage::F64(r))
            }
            _ => bail!("rms_norm: fused kernel runs in f32 or f64"),
        };
        *self.r.lock().unwrap() = Some(r);
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gain: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(
            op: &RmsNorm,
            x: &Tensor,
            gain: &Tensor,
            grad: &Tensor,
        ) -> candle_core::Result<(Tensor, Tensor)> {
            let (dx, dg) = with_data::<T, _>(x, |xd| {
                with_data::<T, _>(gain, |gd| with_data::<T, _>(grad, |dy| op.backward(xd, gd, dy)))
            })?;
            Ok((Tensor::from_vec(dx, x.shape(), x.device())?, Tensor::from_vec(dg, gain.shape(), x.device())?))
        }
        let (dx, dg) = match x.dtype() {
            candle_core::DType::F32 => run::<f32>(self, x, gain, grad)?,
            candle_core::DType::F64 => run::<f64>(self, x, gain, grad)?,
            dt => bail!("rms_norm: fused kernel runs in f32 or f64, not {dt:?}"),
        };
        Ok((Some(dx), Some(dg)))
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
    Ok(x.contiguous()?.apply_op2(&gain.contiguous()?, RmsNorm { eps, r: Mutex::new(None) })?)
}
