//! The custom-op shell the fused kernels plug into. A kernel ([`Kernel`]) is its forward and
//! backward pass written once over any [`Real`]; [`Shell`] makes it a candle `CustomOp1/2/3`:
//! it picks f32 or f64 from the first input's storage in the forward pass, borrows every input,
//! the output and the output's gradient as slices in the backward pass, and wraps the input
//! gradients back into tensors of the inputs' shapes. Every input of a kernel has the first
//! one's float type (cross-entropy, whose targets are u32, and the f32-only `linear` stay
//! plain custom ops).

use super::{cpu_data, tensor_data, Real};
use candle_core::{bail, CpuStorage, CustomOp1, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};

/// What a backward pass gives for one input.
pub(crate) enum Grad<T> {
    /// The gradient's values, in the input's shape.
    Values(Vec<T>),
    /// The output's gradient itself: the input passes through unchanged.
    Output,
    /// None: a constant, or a table nothing tracks.
    None,
}

/// A fused kernel over `N` inputs of one float type (f32, or f64 for gradient checks).
pub(crate) trait Kernel<const N: usize>: Send + Sync {
    /// candle's name of the op, e.g. `itt-rope`.
    const NAME: &'static str;
    /// The kernel in error messages, e.g. `rope`.
    const WHAT: &'static str;

    /// The output's values and shape from the inputs' contiguous values and shapes.
    fn forward<T: Real>(&self, x: [&[T]; N], shapes: [&Shape; N]) -> Result<(Vec<T>, Shape)>;

    /// The inputs' gradients from the inputs (`t`, for shapes and whether they are tracked),
    /// their values `x`, the output's values and the output's gradient `dy`.
    fn backward<T: Real>(&self, t: [&Tensor; N], x: [&[T]; N], out: &[T], dy: &[T]) -> Result<[Grad<T>; N]>;
}

/// A [`Kernel`] as a candle custom op: `x.apply_op2(&y, Shell(kernel))`.
pub(crate) struct Shell<K>(pub K);

fn forward<K: Kernel<N>, const N: usize>(k: &K, args: [(&CpuStorage, &Layout); N]) -> Result<(CpuStorage, Shape)> {
    fn run<K: Kernel<N>, T: Real, const N: usize>(
        k: &K,
        args: [(&CpuStorage, &Layout); N],
    ) -> Result<(CpuStorage, Shape)> {
        let mut x: [&[T]; N] = [&[]; N];
        for (x, (s, l)) in x.iter_mut().zip(args) {
            *x = cpu_data(s, l)?;
        }
        let (y, shape) = k.forward(x, args.map(|(_, l)| l.shape()))?;
        Ok((T::to_cpu_storage_owned(y), shape))
    }
    match args[0].0 {
        CpuStorage::F32(_) => run::<K, f32, N>(k, args),
        CpuStorage::F64(_) => run::<K, f64, N>(k, args),
        _ => bail!("{}: fused kernel runs in f32 or f64", K::WHAT),
    }
}

fn backward<K: Kernel<N>, const N: usize>(
    k: &K,
    t: [&Tensor; N],
    res: &Tensor,
    grad: &Tensor,
) -> Result<[Option<Tensor>; N]> {
    fn run<K: Kernel<N>, T: Real, const N: usize>(
        k: &K,
        t: [&Tensor; N],
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<[Option<Tensor>; N]> {
        // Contiguous views (free for the contiguous inputs the ops were given), then their
        // storage held for the whole pass.
        let inputs = t.iter().map(|t| t.contiguous()).collect::<Result<Vec<_>>>()?;
        let (res, grad) = (res.contiguous()?, grad.contiguous()?);
        let held: Vec<_> = inputs.iter().map(Tensor::storage_and_layout).collect();
        let (rs, gs) = (res.storage_and_layout(), grad.storage_and_layout());
        let mut x: [&[T]; N] = [&[]; N];
        for (x, (s, l)) in x.iter_mut().zip(&held) {
            *x = tensor_data(s, l)?;
        }
        let grads = k.backward(t, x, tensor_data(&rs.0, rs.1)?, tensor_data(&gs.0, gs.1)?)?;
        let mut out: [Option<Tensor>; N] = std::array::from_fn(|_| None);
        for ((o, g), t) in out.iter_mut().zip(grads).zip(t) {
            *o = match g {
                Grad::Values(v) => Some(Tensor::from_vec(v, t.shape(), t.device())?),
                Grad::Output => Some(grad.clone()),
                Grad::None => None,
            };
        }
        Ok(out)
    }
    match t[0].dtype() {
        candle_core::DType::F32 => run::<K, f32, N>(k, t, res, grad),
        candle_core::DType::F64 => run::<K, f64, N>(k, t, res, grad),
        dt => bail!("{}: fused kernel runs in f32 or f64, not {dt:?}", K::WHAT),
    }
}

impl<K: Kernel<1>> CustomOp1 for Shell<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(&self.0, [(s, l)])
    }

    fn bwd(&self, x: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let [dx] = backward(&self.0, [x], res, grad)?;
        Ok(dx)
    }
}

impl<K: Kernel<2>> CustomOp2 for Shell<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        forward(&self.0, [(s1, l1), (s2, l2)])
    }

    fn bwd(&self, a: &Tensor, b: &Tensor, res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [da, db] = backward(&self.0, [a, b], res, grad)?;
        Ok((da, db))
    }
}

impl<K: Kernel<3>> CustomOp3 for Shell<K> {
    fn name(&self) -> &'static str {
        K::NAME
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        forward(&self.0, [(s1, l1), (s2, l2), (s3, l3)])
    }

    fn bwd(
        &self,
        a: &Tensor,
        b: &Tensor,
        c: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let [da, db, dc] = backward(&self.0, [a, b, c], res, grad)?;
        Ok((da, db, dc))
    }
}
