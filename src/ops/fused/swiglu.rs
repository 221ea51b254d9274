//! SwiGLU gate, fused. gate, up: (..., F) -> y like them, elementwise.
//! Forward: s = sigmoid(gate), y = gate * s * up (silu(gate) * up).
//! Backward: dgate = dy * up * s * (1 + gate * (1 - s)),  dup = dy * gate * s.

use super::shell::{Grad, Kernel, Shell};
use super::{for_row_chunks, multiversion, simd_level, Filled, Real};
use crate::{Error, Result};
use candle_core::{bail, Shape, Tensor};

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

impl Kernel<2> for Swiglu {
    const NAME: &'static str = "itt-swiglu";
    const WHAT: &'static str = "swiglu";

    fn forward<T: Real>(&self, [g, u]: [&[T]; 2], shapes: [&Shape; 2]) -> candle_core::Result<(Vec<T>, Shape)> {
        Ok((forward(g, u)?, shapes[0].clone()))
    }

    fn backward<T: Real>(
        &self,
        _: [&Tensor; 2],
        [g, u]: [&[T]; 2],
        _out: &[T],
        dy: &[T],
    ) -> candle_core::Result<[Grad<T>; 2]> {
        let (dg, du) = backward(g, u, dy);
        Ok([Grad::Values(dg), Grad::Values(du)])
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
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, Shell(Swiglu))?)
}
