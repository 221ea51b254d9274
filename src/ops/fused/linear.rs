//! Linear layer, x (N, in), W (out, in) -> y = x W^T (N, out), as one graph node whose backward
//! pass computes dx = dy W (N, in) and dW = dy^T x (out, in) with the operands read through
//! strides (no transposed copies, no zero-filled outputs).
//! - f32: the products run in gemm directly; composed twin `x.matmul(&w.t())`.
//! - bf16: both operands of every product (forward and backward) rounded to bfloat16 and the
//!   products summed in f32, as PyTorch's CPU autocast does for `linear`; the f32 master
//!   weights and the optimiser are untouched. The products run in `bf16_gemm` (AMX tiles where
//!   the CPU has them). Oracle: f64 products of the bf16-rounded operands (`ops::tests`).

use super::bf16_gemm::{gemm_bf16, gemm_f32, MatRef};
use super::{cpu_data, with_data, Filled};
use crate::ops::Precision;
use crate::{Error, Result};
use candle_core::{bail, CpuStorage, CustomOp2, DType, Layout, Shape, Tensor};

struct Linear(Precision);

/// c (m, n) = a . b (row-major, c_rs = n) in `precision`, every element written.
fn product(precision: Precision, m: usize, n: usize, k: usize, a: MatRef, b: MatRef) -> Vec<f32> {
    if k == 0 || m == 0 || n == 0 {
        return vec![0.0; m * n];
    }
    let mut c = Filled::new(m * n);
    let pc = c.ptr();
    // SAFETY: the buffer holds m * n elements and nothing else touches it during the call.
    let cs = unsafe { pc.slice(0, m * n) };
    match precision {
        Precision::Bf16 => gemm_bf16(m, n, k, a, b, cs, n, false),
        Precision::F32 => gemm_f32(m, n, k, a, b, cs),
    }
    // SAFETY: both products, without `accumulate` / `read_dst`, write every element of c.
    unsafe { c.assume_filled() }
}

fn dims(x: &Layout, w: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (n, k) = x.shape().dims2()?;
    let (o, k2) = w.shape().dims2()?;
    if k != k2 {
        bail!("linear: input has {k} features, weight expects {k2}");
    }
    Ok((n, k, o))
}

impl CustomOp2 for Linear {
    fn name(&self) -> &'static str {
        match self.0 {
            Precision::F32 => "itt-linear",
            Precision::Bf16 => "itt-linear-bf16",
        }
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let (n, k, o) = dims(l1, l2)?;
        let (x, w) = (cpu_data::<f32>(s1, l1)?, cpu_data::<f32>(s2, l2)?);
        // y (n, o) = x (n, k) . W^T, W^T[kk][j] = w[j * k + kk].
        let a = MatRef { data: x, row_stride: k, col_stride: 1 };
        let b = MatRef { data: w, row_stride: 1, col_stride: k };
        Ok((CpuStorage::F32(product(self.0, n, o, k, a, b)), Shape::from((n, o))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let (n, k, o) = dims(x.layout(), w.layout())?;
        let (dx, dw) = with_data::<f32, _>(x, |xd| {
            with_data::<f32, _>(w, |wd| {
                with_data::<f32, _>(grad, |dy| {
                    // dx (n, k) = dy (n, o) . W (o, k)
                    let dx = product(
                        self.0,
                        n,
                        k,
                        o,
                        MatRef { data: dy, row_stride: o, col_stride: 1 },
                        MatRef { data: wd, row_stride: k, col_stride: 1 },
                    );
                    // dW (o, k) = dy^T (o, n) . x (n, k); dy^T[j][t] = dy[t * o + j].
                    let dw = product(
                        self.0,
                        o,
                        k,
                        n,
                        MatRef { data: dy, row_stride: 1, col_stride: o },
                        MatRef { data: xd, row_stride: k, col_stride: 1 },
                    );
                    Ok((dx, dw))
                })
            })
        })?;
        Ok((Some(Tensor::from_vec(dx, (n, k), x.device())?), Some(Tensor::from_vec(dw, (o, k), w.device())?)))
    }
}

/// y = x W^T for f32 CPU tensors x (N, in), W (out, in) -> (N, out), with the products in
/// `precision` (f32, or bf16 x bf16 -> f32).
pub fn linear(x: &Tensor, w: &Tensor, precision: Precision) -> Result<Tensor> {
    if x.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Err(Error::usage(format!("linear: f32 tensors expected, got {:?} and {:?}", x.dtype(), w.dtype())));
    }
    let (x_dims, w_dims) = (x.dims(), w.dims());
    if x_dims.len() != 2 || w_dims.len() != 2 || x_dims[1] != w_dims[1] {
        return Err(Error::usage(format!("linear: x {x_dims:?} and W {w_dims:?} do not fit x W^T")));
    }
    Ok(x.contiguous()?.apply_op2(&w.contiguous()?, Linear(precision))?)
}
