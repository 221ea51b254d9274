//! Patch 9 of the vendored candle-core (vendor/candle-core/ITT-PATCH.md): with candle's own pool
//! off (`CANDLE_NUM_THREADS=1`, as itt runs), element-wise ops of >= 64K elements called from a
//! worker of a rayon pool run their work units on that pool's threads. Each output element
//! must be the same float as on one thread and as the host's own arithmetic, for contiguous,
//! broadcast and strided operands. One test in this file: it sets the variable before candle
//! builds its pool.

use candle_core::{Device, Tensor};

fn data(n: usize, k: f32) -> Vec<f32> {
    (0..n).map(|i| (i as f32 * 0.37 + k).sin() * 3.0 + 0.01).collect()
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap().iter().map(|v| v.to_bits()).collect()
}

/// Every op's output, computed on whatever thread calls this.
fn outputs(r: usize, c: usize) -> Vec<Vec<u32>> {
    let n = r * c;
    let a = Tensor::from_vec(data(n, 0.0), (r, c), &Device::Cpu).unwrap();
    let b = Tensor::from_vec(data(n, 1.0), (r, c), &Device::Cpu).unwrap();
    let bt = Tensor::from_vec(data(n, 2.0), (c, r), &Device::Cpu).unwrap().t().unwrap(); // strided
    let row = Tensor::from_vec(data(c, 3.0), c, &Device::Cpu).unwrap();
    let col = Tensor::from_vec(data(r, 4.0), (r, 1), &Device::Cpu).unwrap();
    vec![
        bits(&(&a + &b).unwrap()),
        bits(&(&a - &b).unwrap()),
        bits(&(&a * &b).unwrap()),
        bits(&(&a / &b).unwrap()),
        bits(&(&a * &bt).unwrap()),
        bits(&a.broadcast_mul(&row).unwrap()),
        bits(&a.broadcast_sub(&col).unwrap()),
        bits(&a.exp().unwrap()),
        bits(&a.sqr().unwrap()),
        bits(&a.neg().unwrap()),
        bits(&a.abs().unwrap().sqrt().unwrap()),
    ]
}

#[test]
fn large_element_wise_ops_give_the_same_bits_on_rayon_threads() {
    std::env::set_var("CANDLE_NUM_THREADS", "1");
    let (r, c) = (300, 1024); // 307,200 elements: 19 work units of 16K
    let serial = outputs(r, c);
    for threads in [2, 3] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
        let on_pool = pool.install(|| outputs(r, c));
        for (k, (s, p)) in serial.iter().zip(&on_pool).enumerate() {
            assert!(s == p, "op {k} differs on {threads} rayon threads");
        }
    }
    // And the serial results are the host's arithmetic, element by element.
    let n = r * c;
    let (a, b, b2) = (data(n, 0.0), data(n, 1.0), data(n, 2.0));
    let (row, col) = (data(c, 3.0), data(r, 4.0));
    let want: Vec<Box<dyn Fn(usize) -> f32>> = vec![
        Box::new(|i| a[i] + b[i]),
        Box::new(|i| a[i] - b[i]),
        Box::new(|i| a[i] * b[i]),
        Box::new(|i| a[i] / b[i]),
        Box::new(|i| a[i] * b2[(i % c) * r + i / c]),
        Box::new(|i| a[i] * row[i % c]),
        Box::new(|i| a[i] - col[i / c]),
    ];
    for (k, (f, got)) in want.iter().zip(&serial).enumerate() {
        for (i, &g) in got.iter().enumerate() {
            assert_eq!(g, f(i).to_bits(), "op {k}, element {i}");
        }
    }
    for (i, &v) in a.iter().enumerate() {
        assert_eq!(serial[8][i], (v * v).to_bits(), "sqr, element {i}");
        assert_eq!(serial[9][i], (-v).to_bits(), "neg, element {i}");
    }
}
