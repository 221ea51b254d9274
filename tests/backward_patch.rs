//! The vendored candle-core's backward pass (vendor/candle-core/ITT-PATCH.md) stores a node's
//! first gradient as it is instead of adding it to zeros. These check what that could break:
//! gradients that arrive as views (transposed, broadcast), gradients shared by both sides of an
//! add, several paths into one variable, and a backward rule returning the wrong shape; and
//! patch 3's sums on several threads.

use candle_core::{CpuStorage, CustomOp1, DType, Device, Layout, Shape, Tensor, Var};

fn var(data: &[f32], shape: (usize, usize)) -> Var {
    Var::from_tensor(&Tensor::from_slice(data, shape, &Device::Cpu).unwrap()).unwrap()
}

#[test]
fn gradients_through_views_and_shared_paths_are_contiguous_and_exact() {
    let x = Tensor::from_slice(&[1f32, 2., 3., 4., 5., 6.], (3, 2), &Device::Cpu).unwrap();
    let w = var(&[0.5f32, -1., 2., 0.25], (2, 2));
    // y = x w^T + x w^T (the same gradient reaches both sides of the add), loss = sum(y * c).
    let c = Tensor::from_slice(&[1f32, -2., 3., 0.5, -1., 2.], (3, 2), &Device::Cpu).unwrap();
    let xw = x.matmul(&w.as_tensor().t().unwrap()).unwrap();
    let y = (&xw + &xw).unwrap();
    // A broadcast gradient too: b (1, 2) added to every row.
    let b = var(&[0.1f32, 0.2], (1, 2));
    let y = y.broadcast_add(b.as_tensor()).unwrap();
    let loss = (&y * &c).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();

    let gw = grads.get(w.as_tensor()).unwrap();
    let gb = grads.get(b.as_tensor()).unwrap();
    assert!(gw.is_contiguous() && gb.is_contiguous());
    // dL/dw = 2 c^T x; dL/db = column sums of c.
    let c_t = c.to_vec2::<f32>().unwrap();
    let x_t = x.to_vec2::<f32>().unwrap();
    let mut want = [[0f32; 2]; 2];
    for (cr, xr) in c_t.iter().zip(&x_t) {
        for o in 0..2 {
            for i in 0..2 {
                want[o][i] += 2.0 * cr[o] * xr[i];
            }
        }
    }
    assert_eq!(gw.to_vec2::<f32>().unwrap(), want.iter().map(|r| r.to_vec()).collect::<Vec<_>>());
    assert_eq!(gb.to_vec2::<f32>().unwrap(), vec![vec![1. + 3. - 1., -2. + 0.5 + 2.]]);
    // The gradient of w arrived as the transpose of a product: the stored value is a copy,
    // not a view of another node's gradient, and equals the transpose it came from.
    assert_eq!(gw.layout().stride(), &[2, 1]);
}

/// An op whose backward rule returns a gradient of the wrong shape.
struct WrongShapeGrad;

impl CustomOp1 for WrongShapeGrad {
    fn name(&self) -> &'static str {
        "wrong-shape-grad"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        let data = s.as_slice::<f32>()?;
        let (a, b) = l.contiguous_offsets().unwrap();
        Ok((CpuStorage::F32(data[a..b].to_vec()), l.shape().clone()))
    }
    fn bwd(&self, _arg: &Tensor, _res: &Tensor, _grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(Tensor::zeros(7, DType::F32, &Device::Cpu)?))
    }
}

#[test]
fn a_gradient_of_the_wrong_shape_is_an_error_not_stored() {
    let w = var(&[1f32, 2., 3., 4.], (2, 2));
    let y = w.as_tensor().apply_op1(WrongShapeGrad).unwrap();
    let err = y.sum_all().unwrap().backward().unwrap_err().to_string();
    assert!(err.contains("shape mismatch"), "{err}");
}

#[test]
fn large_gradient_sums_are_exact_on_any_thread_count() {
    // Patch 3: sums of >= 64K f32 elements are added on rayon's threads. A variable reached by
    // four paths (two plain products, a transposed view, which candle's `add` takes, and a narrow
    // slice) must get the same bits on any number of threads, and the sum of its paths.
    let (r, c) = (300, 256);
    let n = r * c;
    let data = |k: f32| (0..n).map(|i| (i as f32 * 0.37 + k).sin()).collect::<Vec<f32>>();
    let run = |threads: usize| {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        pool.install(|| {
            let x = var(&data(0.0), (r, c));
            let (a, b) = (
                Tensor::from_vec(data(1.0), (r, c), &Device::Cpu).unwrap(),
                Tensor::from_vec(data(2.0), (r, c), &Device::Cpu).unwrap(),
            );
            let bt = Tensor::from_vec(data(3.0), (c, r), &Device::Cpu).unwrap();
            let xt = x.as_tensor().t().unwrap();
            let loss = ((x.as_tensor() * &a).unwrap().sum_all().unwrap()
                + (x.as_tensor() * &b).unwrap().sum_all().unwrap()
                + (&xt * &bt).unwrap().sum_all().unwrap()
                + x.as_tensor().narrow(0, 10, 200).unwrap().sqr().unwrap().sum_all().unwrap())
            .unwrap();
            let g =
                loss.backward().unwrap().get(x.as_tensor()).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap();
            (g, a, b, bt, x)
        })
    };
    let (g1, a, b, bt, x) = run(1);
    let (g3, ..) = run(3);
    assert_eq!(g1, g3, "the sum changed with the thread count");
    // The order candle adds the paths in is its own, so compare with the host's sum within one
    // rounding per addition.
    let (a, b, btt, xv) = (
        a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        bt.t().unwrap().contiguous().unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        x.as_tensor().flatten_all().unwrap().to_vec1::<f32>().unwrap(),
    );
    for i in 0..n {
        let row = i / c;
        let sq = if (10..210).contains(&row) { 2.0 * xv[i] } else { 0.0 };
        let want = a[i] + b[i] + btt[i] + sq;
        assert!(
            (g1[i] - want).abs() <= 4.0 * f32::EPSILON * (a[i].abs() + b[i].abs() + btt[i].abs() + sq.abs()),
            "element {i}"
        );
    }
}
