//! Cross-entropy with the softmax over the logits, fused. logits: (N, V), targets: (N,) u32 ->
//! the mean over rows of lse(z) - z[target], a scalar.
//! Forward: per row lse = max + ln sum exp(z - max) (saved); no (N, V) temporaries.
//! Backward: dz = g / N * (exp(z - lse) - onehot(target)), written once.

use super::{for_row_chunks, max, multiversion, simd_level, with_data, Filled, Real, LANES};
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor, WithDType};
use std::sync::Mutex;

multiversion! {
    /// lse of each row of z (rows, v).
    fn lse_rows<T: Real, const FMA: bool>(z: &[T], v: usize, lse: &mut [T]) {
        for (row, lse) in z.chunks_exact(v).zip(lse.iter_mut()) {
            let m = max(row);
            let mut acc = [T::ZERO; LANES];
            let mut chunks = row.chunks_exact(LANES);
            for c in &mut chunks {
                for l in 0..LANES {
                    acc[l] += (c[l] - m).exp();
                }
            }
            for (l, &x) in chunks.remainder().iter().enumerate() {
                acc[l] += (x - m).exp();
            }
            *lse = m + super::hsum(acc).ln();
        }
    }
}

multiversion! {
    /// dz rows = scale * softmax(z) (the one-hot part is subtracted by the caller).
    fn softmax_rows<T: Real, const FMA: bool>(z: &[T], v: usize, lse: &[T], scale: T, dz: &mut [T]) {
        for ((row, d), &lse) in z.chunks_exact(v).zip(dz.chunks_exact_mut(v)).zip(lse) {
            for (d, &x) in d.iter_mut().zip(row) {
                *d = scale * (x - lse).exp();
            }
        }
    }
}

struct CrossEntropy {
    /// lse per row, saved by the forward pass.
    lse: Mutex<Option<CpuStorage>>,
}

fn check_targets(t: &[u32], n: usize, v: usize) -> candle_core::Result<()> {
    if t.len() != n {
        bail!("cross_entropy: {} targets for {n} rows of logits", t.len());
    }
    if let Some(&bad) = t.iter().find(|&&t| t as usize >= v) {
        bail!("cross_entropy: target {bad} is outside the vocabulary of {v}");
    }
    Ok(())
}

impl CrossEntropy {
    fn forward<T: Real>(&self, z: &[T], t: &[u32], n: usize, v: usize) -> candle_core::Result<(T, Vec<T>)> {
        check_targets(t, n, v)?;
        let mut lse = Filled::new(n);
        let pl = lse.ptr();
        let simd = simd_level();
        for_row_chunks(n, v, |rg| {
            // SAFETY: each chunk writes only its own rows.
            let lc = unsafe { pl.slice(rg.start, rg.len()) };
            lse_rows::<T>(simd, &z[rg.start * v..rg.end * v], v, lc);
        });
        // SAFETY: the chunks cover every row.
        let lse = unsafe { lse.assume_filled() };
        // Summed in f64, in row order.
        let total: f64 = (0..n).map(|i| lse[i].to_f64() - z[i * v + t[i] as usize].to_f64()).sum();
        Ok((T::of(total / n as f64), lse))
    }

    fn backward<T: Real>(&self, z: &[T], t: &[u32], g: f64, n: usize, v: usize) -> candle_core::Result<Vec<T>> {
        let guard = self.lse.lock().unwrap();
        let Some(lse) = guard.as_ref() else { bail!("cross_entropy backward before its forward pass") };
        let lse = T::cpu_storage_as_slice(lse)?;
        let scale = T::of(g / n as f64);
        let mut dz = Filled::new(z.len());
        let pd = dz.ptr();
        let simd = simd_level();
        for_row_chunks(n, v, |rg| {
            // SAFETY: each chunk writes only its own rows.
            let dc = unsafe { pd.slice(rg.start * v, rg.len() * v) };
            softmax_rows::<T>(simd, &z[rg.start * v..rg.end * v], v, &lse[rg.clone()], scale, dc);
            for (r, i) in rg.enumerate() {
                dc[r * v + t[i] as usize] -= scale;
            }
        });
        // SAFETY: the chunks cover every row.
        Ok(unsafe { dz.assume_filled() })
    }
}

impl CustomOp2 for CrossEntropy {
    fn name(&self) -> &'static str {
        "itt-cross-entropy"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::cpu_data as d;
        let (n, v) = l1.shape().dims2()?;
        let t = match l2.contiguous_offsets() {
            Some((a, b)) => &u32::cpu_storage_as_slice(s2)?[a..b],
            None => bail!("cross_entropy: non-contiguous targets (internal error)"),
        };
        let (loss, lse) = match s1 {
            CpuStorage::F32(_) => {
                let (loss, lse) = self.forward::<f32>(d(s1, l1)?, t, n, v)?;
                (CpuStorage::F32(vec![loss]), CpuStorage::F32(lse))
            }
            CpuStorage::F64(_) => {
                let (loss, lse) = self.forward::<f64>(d(s1, l1)?, t, n, v)?;
                (CpuStorage::F64(vec![loss]), CpuStorage::F64(lse))
            }
            _ => bail!("cross_entropy: fused kernel runs in f32 or f64"),
        };
        *self.lse.lock().unwrap() = Some(lse);
        Ok((loss, Shape::from(())))
    }

    fn bwd(
        &self,
        logits: &Tensor,
        targets: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, v) = logits.dims2()?;
        let t = targets.to_vec1::<u32>()?;
        let g = grad.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        let dz = match logits.dtype() {
            DType::F32 => Tensor::from_vec(
                with_data::<f32, _>(logits, |z| self.backward(z, &t, g, n, v))?,
                (n, v),
                logits.device(),
            )?,
            DType::F64 => Tensor::from_vec(
                with_data::<f64, _>(logits, |z| self.backward(z, &t, g, n, v))?,
                (n, v),
                logits.device(),
            )?,
            dt => bail!("cross_entropy: fused kernel runs in f32 or f64, not {dt:?}"),
        };
        Ok((Some(dz), None))
    }
}

/// Fused twin of `composed::cross_entropy`: mean cross-entropy of logits (N, V) against
/// targets (N,) u32, a scalar.
pub fn cross_entropy(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let (n, _v) = logits.dims2()?;
    if targets.dims() != [n] || targets.dtype() != DType::U32 {
        return Err(Error::usage(format!(
            "cross_entropy: targets {:?} {:?} do not match logits {:?} (need ({n},) u32)",
            targets.dims(),
            targets.dtype(),
            logits.dims()
        )));
    }
    if n == 0 {
        return crate::ops::composed::cross_entropy(logits, targets);
    }
    Ok(logits.contiguous()?.apply_op2(&targets.contiguous()?, CrossEntropy { lse: Mutex::new(None) })?)
}
