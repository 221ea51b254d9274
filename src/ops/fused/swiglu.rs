//! SwiGLU gate, fused. gate, up: (..., F) -> y like them, elementwise.
//! Forward: s = sigmoid(gate), y = gate * s * up (silu(gate) * up).
//! Backward: dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s.

use super::{for_row_chunks, multiversion, simd_level, with_data, Filled, Real};
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp2, Layout, Shape, Tensor};

multiversion! {
    fn fwd_elems<T: Real, const FMA: bool>(g: &[T], u: &[T], y: &mut [T]) {
        for ((y, &g), &u) in y.iter_mut().zip(g).zip(u) {
            let s = T::ONE / (T::ONE + (-g).exp());
            *y = g * s * u;
        }
    }
}

multiversion! {
    fn bwd_elems<T: Real, const FMA: bool>(g: &[T], u: &[T], dy: &[T], dg: &mut [T], du: &mut [T]) {
        for ((((dg, du), &g), &u), &dy) in dg.iter_mut().zip(du.iter_mut()).zip(g).zip(u).zip(dy) {
            let s = T::ONE / (T::ONE + (-g).exp());
            *dg = dy * u * s * (T::ONE + g * (T::ONE - s));
            *du = dy * g * s;
        }
    }
}

struct Swiglu;

fn forward<T: Real>(g: &[T], u: &[T]) -> candle_core::Result<Vec<T>> {
    if g.len() != u.len() {
        bail!("swiglu: gate has {} elements, up {}", g.len(), u.len());
    }
    let mut y = Filled::new(g.len());
    let py = y.ptr();
    let simd = simd_level();
    for_row_chunks(g.len(), 1, |rg| {
        // SAFETY: each chunk writes only its own elements.
        let yc = unsafe { py.slice(rg.start, rg.len()) };
        fwd_elems::<T>(simd, &g[rg.clone()], &u[rg], yc);
    });
    // SAFETY: the chunks cover every element.
    Ok(unsafe { y.assume_filled() })
}

fn backward<T: Real>(g: &[T], u: &[T], dy: &[T]) -> (Vec<T>, Vec<T>) {
    let (mut dg, mut du) = (Filled::new(g.len()), Filled::new(g.len()));
    let (pg, pu) = (dg.ptr(), du.ptr());
    let simd = simd_level();
    for_row_chunks(g.len(), 1, |rg| {
        // SAFETY: each chunk writes only its own elements.
        let (dgc, duc) = unsafe { (pg.slice(rg.start, rg.len()), pu.slice(rg.start, rg.len())) };
        bwd_elems::<T>(simd, &g[rg.clone()], &u[rg.clone()], &dy[rg], dgc, duc);
    });
    // SAFETY: the chunks cover every element.
    unsafe { (dg.assume_filled(), du.assume_filled()) }
}

impl CustomOp2 for Swiglu {
    fn name(&self) -> &'static str {
        "itt-swiglu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        use super::cpu_data as d;
        let y = match s1 {
            CpuStorage::F32(_) => CpuStorage::F32(forward::<f32>(d(s1, l1)?, d(s2, l2)?)?),
            CpuStorage::F64(_) => CpuStorage::F64(forward::<f64>(d(s1, l1)?, d(s2, l2)?)?),
            _ => bail!("swiglu: fused kernel runs in f32 or f64"),
        };
        Ok((y, l1.shape().clone()))
    }

    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        fn run<T: Real>(gate: &Tensor, up: &Tensor, grad: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
            let (dg, du) = with_data::<T, _>(gate, |g| {
                with_data::<T, _>(up, |u| with_data::<T, _>(grad, |dy| Ok(backward(g, u, dy))))
            })?;
            Ok((Tensor::from_vec(dg, gate.shape(), gate.device())?, Tensor::from_vec(du, up.shape(), up.device())?))
        }
        let (dg, du) = match gate.dtype() {
            candle_core::DType::F32 => run::<f32>(gate, up, grad)?,
            candle_core::DType::F64 => run::<f64>(gate, up, grad)?,
            dt => bail!("swiglu: fused kernel runs in f32 or f64, not {dt:?}"),
        };
        Ok((Some(dg), Some(du)))
    }
}

/// Fused twin of `composed::swiglu`: silu(gate) * up, gate and up of one shape.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if gate.dims() != up.dims() {
        return Err(Error::usage(format!("swiglu: gate {:?} and up {:?} differ in shape", gate.dims(), up.dims())));
    }
    if gate.elem_count() == 0 {
        return crate::ops::composed::swiglu(gate, up);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Swiglu)?)
}
