//! Singular values for the gradient-spike study (DESIGN §10): the nuclear norm
//! ||G||_* = sum_i sigma_i(G), with sigma_i^2 the eigenvalues of the Gram matrix G^T G (or
//! G G^T, whichever is smaller), found by the cyclic Jacobi method in f64.
//!
//! Jacobi is slow next to LAPACK (O(n^3) per sweep, 6–10 sweeps) but short, dependency-free
//! and accurate for symmetric matrices; the matrices here are attention projections
//! (d x d, a few hundred wide at most). Squaring G in the Gram matrix loses the smallest
//! singular values below sqrt(eps) * sigma_max, which changes a sum of singular values by
//! less than n * 1e-8 relative: immaterial for the nuclear norm.

/// Eigenvalues (ascending) and, if asked, eigenvectors of a symmetric n x n matrix (row-major;
/// only symmetry-consistent input is meaningful). Eigenvector k is column k of the returned
/// row-major n x n matrix.
pub fn sym_eigen(a: &[f64], n: usize, vectors: bool) -> (Vec<f64>, Option<Vec<f64>>) {
    assert_eq!(a.len(), n * n, "sym_eigen: matrix of {} values is not {n} x {n}", a.len());
    let mut a = a.to_vec();
    let mut v = vectors.then(|| {
        let mut v = vec![0.0; n * n];
        (0..n).for_each(|i| v[i * n + i] = 1.0);
        v
    });
    let total: f64 = a.iter().map(|x| x * x).sum();
    for _sweep in 0..60 {
        let off: f64 = (0..n)
            .flat_map(|i| (0..n).filter(move |&j| j != i).map(move |j| (i, j)))
            .map(|(i, j)| a[i * n + j].powi(2))
            .sum();
        if off <= 1e-30 * total.max(f64::MIN_POSITIVE) {
            break;
        }
        for p in 0..n {
            for q in p + 1..n {
                let apq = a[p * n + q];
                let (app, aqq) = (a[p * n + p], a[q * n + q]);
                // Skip rotations that cannot change the diagonal at f64 precision.
                if apq.abs() <= 1e-18 * (app.abs() + aqq.abs()) || apq == 0.0 {
                    continue;
                }
                // Rotation J(p, q, theta) with tan(theta) = t zeroing a_pq (Numerical Recipes
                // §11.1): theta = (a_qq - a_pp) / (2 a_pq), t the smaller root.
                let theta = (aqq - app) / (2.0 * apq);
                let t = theta.signum() / (theta.abs() + (theta * theta + 1.0).sqrt());
                let t = if theta == 0.0 { 1.0 } else { t };
                let c = 1.0 / (t * t + 1.0).sqrt();
                let s = t * c;
                // A <- J^T A J: columns p, q, then rows p, q.
                for k in 0..n {
                    let (akp, akq) = (a[k * n + p], a[k * n + q]);
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for k in 0..n {
                    let (apk, aqk) = (a[p * n + k], a[q * n + k]);
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                a[p * n + q] = 0.0;
                a[q * n + p] = 0.0;
                if let Some(v) = v.as_mut() {
                    for k in 0..n {
                        let (vkp, vkq) = (v[k * n + p], v[k * n + q]);
                        v[k * n + p] = c * vkp - s * vkq;
                        v[k * n + q] = s * vkp + c * vkq;
                    }
                }
            }
        }
    }
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| a[i * n + i].total_cmp(&a[j * n + j]));
    let values = order.iter().map(|&i| a[i * n + i]).collect();
    let v = v.map(|v| {
        let mut sorted = vec![0.0; n * n];
        for (new, &old) in order.iter().enumerate() {
            for k in 0..n {
                sorted[k * n + new] = v[k * n + old];
            }
        }
        sorted
    });
    (values, v)
}

/// Singular values (descending) of a rows x cols matrix (row-major), from the eigenvalues of
/// the smaller Gram matrix.
pub fn singular_values(g: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    assert_eq!(g.len(), rows * cols, "singular_values: {} values is not {rows} x {cols}", g.len());
    let (n, gram) = if cols <= rows {
        // G^T G: (cols, cols)
        let mut m = vec![0.0; cols * cols];
        for r in 0..rows {
            let row = &g[r * cols..(r + 1) * cols];
            for i in 0..cols {
                let gi = row[i];
                if gi == 0.0 {
                    continue;
                }
                for j in i..cols {
                    m[i * cols + j] += gi * row[j];
                }
            }
        }
        (cols, m)
    } else {
        // G G^T: (rows, rows)
        let mut m = vec![0.0; rows * rows];
        for i in 0..rows {
            for j in i..rows {
                m[i * rows + j] = (0..cols).map(|k| g[i * cols + k] * g[j * cols + k]).sum();
            }
        }
        (rows, m)
    };
    let mut gram = gram;
    for i in 0..n {
        for j in 0..i {
            gram[i * n + j] = gram[j * n + i];
        }
    }
    let (eig, _) = sym_eigen(&gram, n, false);
    let mut s: Vec<f64> = eig.into_iter().map(|e| e.max(0.0).sqrt()).collect();
    s.reverse();
    s
}

/// ||G||_*, the sum of singular values.
pub fn nuclear_norm(g: &[f64], rows: usize, cols: usize) -> f64 {
    singular_values(g, rows, cols).iter().sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::base::rng::Rng;

    /// A random n x k matrix with orthonormal columns (modified Gram-Schmidt on normals).
    fn orthonormal(rng: &mut Rng, n: usize, k: usize) -> Vec<f64> {
        let mut q = vec![0.0; n * k];
        for j in 0..k {
            let mut col: Vec<f64> = (0..n).map(|_| rng.normal()).collect();
            for p in 0..j {
                let dot: f64 = (0..n).map(|i| col[i] * q[i * k + p]).sum();
                (0..n).for_each(|i| col[i] -= dot * q[i * k + p]);
            }
            let norm = col.iter().map(|x| x * x).sum::<f64>().sqrt();
            (0..n).for_each(|i| q[i * k + j] = col[i] / norm);
        }
        q
    }

    /// U diag(s) V^T for random orthonormal U (m x k), V (n x k).
    fn with_singular_values(rng: &mut Rng, m: usize, n: usize, s: &[f64]) -> Vec<f64> {
        let k = s.len();
        let (u, v) = (orthonormal(rng, m, k), orthonormal(rng, n, k));
        let mut g = vec![0.0; m * n];
        for i in 0..m {
            for j in 0..n {
                g[i * n + j] = (0..k).map(|p| u[i * k + p] * s[p] * v[j * k + p]).sum();
            }
        }
        g
    }

    #[test]
    fn eigen_of_known_symmetric_matrices() {
        let (e, v) = sym_eigen(&[2.0, 1.0, 1.0, 2.0], 2, true);
        assert!((e[0] - 1.0).abs() < 1e-14 && (e[1] - 3.0).abs() < 1e-14, "{e:?}");
        let v = v.unwrap();
        // A v = lambda v for each column.
        for k in 0..2 {
            let av0 = 2.0 * v[k] + v[2 + k];
            assert!((av0 - e[k] * v[k]).abs() < 1e-12);
        }
        // Diagonal input: already done.
        assert_eq!(sym_eigen(&[5.0, 0.0, 0.0, -1.0], 2, false).0, vec![-1.0, 5.0]);
        // A 6 x 6 with known spectrum: Q diag(l) Q^T.
        let mut rng = Rng::new(3);
        let l = [-2.0, 0.0, 0.5, 1.0, 1.0, 7.0];
        let q = orthonormal(&mut rng, 6, 6);
        let a: Vec<f64> =
            (0..36).map(|ij| (0..6).map(|p| q[(ij / 6) * 6 + p] * l[p] * q[(ij % 6) * 6 + p]).sum()).collect();
        let (e, v) = sym_eigen(&a, 6, true);
        let v = v.unwrap();
        for (x, y) in e.iter().zip(l) {
            assert!((x - y).abs() < 1e-12, "{e:?}");
        }
        for k in 0..6 {
            for i in 0..6 {
                let av: f64 = (0..6).map(|j| a[i * 6 + j] * v[j * 6 + k]).sum();
                assert!((av - e[k] * v[i * 6 + k]).abs() < 1e-10);
            }
        }
    }

    #[test]
    fn nuclear_norm_recovers_known_singular_values() {
        let mut rng = Rng::new(11);
        // Tall, wide and rank-deficient shapes; singular values spread over 6 decades.
        for (m, n, s) in [
            (9usize, 6usize, vec![10.0, 4.0, 2.5, 1.0, 0.3, 1e-3]),
            (5, 12, vec![3.0, 3.0, 2.0, 0.5, 0.25]),
            (40, 32, vec![100.0, 1.0, 0.01]),
        ] {
            let g = with_singular_values(&mut rng, m, n, &s);
            let got = singular_values(&g, m, n);
            assert_eq!(got.len(), m.min(n));
            for (i, want) in s.iter().enumerate() {
                let tol = 1e-9 * s[0] + 1e-7 * want;
                assert!((got[i] - want).abs() < tol.max(1e-7), "{m}x{n}: sigma_{i} {} vs {want}", got[i]);
            }
            // The rest are zero (up to sqrt(eps) * sigma_max from the Gram matrix).
            assert!(got[s.len()..].iter().all(|&x| x < 1e-6 * s[0]), "{got:?}");
            let want: f64 = s.iter().sum();
            let nn = nuclear_norm(&g, m, n);
            assert!((nn - want).abs() < 1e-6 * want, "nuclear norm {nn} vs {want}");
        }
        // Known small case: [[3, 0], [4, 5]] has singular values sqrt(45), sqrt(5).
        let s = singular_values(&[3.0, 0.0, 4.0, 5.0], 2, 2);
        assert!((s[0] - 45f64.sqrt()).abs() < 1e-12 && (s[1] - 5f64.sqrt()).abs() < 1e-12, "{s:?}");
        assert_eq!(nuclear_norm(&[0.0; 6], 2, 3), 0.0);
    }
}
