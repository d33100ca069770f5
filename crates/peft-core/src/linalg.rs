//! Small dense linear algebra in f64 on the CPU: the singular value decomposition that
//! PiSSA initialisation and SVD-based adapter combination need (burn has none).
//!
//! [`svd`] is the one-sided Jacobi method (Hestenes, 1958): plane rotations orthogonalise
//! the columns of `A` (or of `A^T` when `A` is wide) until every pair is orthogonal to
//! machine precision; the column norms are the singular values. It is accurate to a few
//! ulps of `||A||` and costs `O(k^2 * max(m, n))` per sweep with `k = min(m, n)`, which is
//! fine for adapter-sized and layer-sized matrices. [`svd_of_product`] decomposes a low-rank
//! product `B A` (a LoRA delta) without forming it.
//!
//! ```
//! use peft_core::linalg::{svd, Matrix};
//!
//! let a = Matrix::new(2, 2, vec![3.0, 0.0, 4.0, 5.0]);
//! let d = svd(&a);
//! assert!((d.s[0] - 45f64.sqrt()).abs() < 1e-12 && (d.s[1] - 5f64.sqrt()).abs() < 1e-12);
//! assert!(d.reconstruct().max_abs_diff(&a) < 1e-12);
//! ```

use burn::tensor::TensorData;

use crate::error::{PeftError, Result};

/// A dense row-major f64 matrix.
#[derive(Clone, Debug, PartialEq)]
pub struct Matrix {
    /// Number of rows.
    pub rows: usize,
    /// Number of columns.
    pub cols: usize,
    /// `rows * cols` values, row after row.
    pub data: Vec<f64>,
}

impl Matrix {
    /// A matrix from row-major values.
    ///
    /// # Panics
    /// When `data.len() != rows * cols` (a programming error).
    pub fn new(rows: usize, cols: usize, data: Vec<f64>) -> Self {
        assert_eq!(
            data.len(),
            rows * cols,
            "Matrix::new: wrong number of values"
        );
        Self { rows, cols, data }
    }

    /// The zero matrix.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Self::new(rows, cols, vec![0.0; rows * cols])
    }

    /// The identity.
    pub fn identity(n: usize) -> Self {
        let mut m = Self::zeros(n, n);
        for i in 0..n {
            m.data[i * n + i] = 1.0;
        }
        m
    }

    /// A matrix from 2-D tensor data of any float type.
    ///
    /// # Errors
    /// [`PeftError::Unsupported`] for data that is not 2-D.
    pub fn from_tensor_data(data: &TensorData) -> Result<Self> {
        let [rows, cols] = data.shape[..] else {
            return Err(PeftError::Unsupported(format!(
                "expected a matrix, found a tensor of shape {:?}",
                data.shape
            )));
        };
        let values = data
            .clone()
            .convert::<f64>()
            .to_vec::<f64>()
            .map_err(|e| PeftError::Unsupported(format!("cannot read tensor values: {e:?}")))?;
        Ok(Self::new(rows, cols, values))
    }

    /// The matrix as f32 tensor data `[rows, cols]`.
    pub fn to_tensor_data(&self) -> TensorData {
        let v: Vec<f32> = self.data.iter().map(|&x| x as f32).collect();
        TensorData::new(v, [self.rows, self.cols])
    }

    /// The value at row `i`, column `j`.
    pub fn get(&self, i: usize, j: usize) -> f64 {
        self.data[i * self.cols + j]
    }

    /// Sets the value at row `i`, column `j`.
    pub fn set(&mut self, i: usize, j: usize, v: f64) {
        self.data[i * self.cols + j] = v;
    }

    /// The transpose.
    pub fn transpose(&self) -> Self {
        let mut t = Self::zeros(self.cols, self.rows);
        for i in 0..self.rows {
            for j in 0..self.cols {
                t.data[j * self.rows + i] = self.data[i * self.cols + j];
            }
        }
        t
    }

    /// `self * other`.
    ///
    /// # Panics
    /// On mismatched inner dimensions (a programming error).
    pub fn matmul(&self, other: &Self) -> Self {
        assert_eq!(
            self.cols, other.rows,
            "Matrix::matmul: inner dimensions differ"
        );
        let mut out = Self::zeros(self.rows, other.cols);
        for i in 0..self.rows {
            for k in 0..self.cols {
                let a = self.data[i * self.cols + k];
                if a == 0.0 {
                    continue;
                }
                let row = &other.data[k * other.cols..(k + 1) * other.cols];
                let dst = &mut out.data[i * other.cols..(i + 1) * other.cols];
                for (d, &b) in dst.iter_mut().zip(row) {
                    *d += a * b;
                }
            }
        }
        out
    }

    /// `self * s` element-wise.
    pub fn scale(&self, s: f64) -> Self {
        Self::new(
            self.rows,
            self.cols,
            self.data.iter().map(|x| x * s).collect(),
        )
    }

    /// The largest absolute element-wise difference (infinite for different shapes).
    pub fn max_abs_diff(&self, other: &Self) -> f64 {
        if (self.rows, self.cols) != (other.rows, other.cols) {
            return f64::INFINITY;
        }
        self.data
            .iter()
            .zip(&other.data)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0, f64::max)
    }

    /// Columns `start..end`.
    pub fn columns(&self, start: usize, end: usize) -> Self {
        let mut out = Self::zeros(self.rows, end - start);
        for i in 0..self.rows {
            for j in start..end {
                out.data[i * (end - start) + j - start] = self.get(i, j);
            }
        }
        out
    }

    /// Rows `start..end`.
    pub fn row_range(&self, start: usize, end: usize) -> Self {
        Self::new(
            end - start,
            self.cols,
            self.data[start * self.cols..end * self.cols].to_vec(),
        )
    }

    fn column_vecs(&self) -> Vec<Vec<f64>> {
        (0..self.cols)
            .map(|j| (0..self.rows).map(|i| self.get(i, j)).collect())
            .collect()
    }

    fn from_column_vecs(rows: usize, cols: &[Vec<f64>]) -> Self {
        let mut m = Self::zeros(rows, cols.len());
        for (j, c) in cols.iter().enumerate() {
            for (i, &v) in c.iter().enumerate() {
                m.data[i * cols.len() + j] = v;
            }
        }
        m
    }
}

/// A thin singular value decomposition `A = U diag(s) V^T`.
#[derive(Clone, Debug)]
pub struct Svd {
    /// `[m, k]`, orthonormal columns.
    pub u: Matrix,
    /// `k` singular values, non-negative and in descending order.
    pub s: Vec<f64>,
    /// `V^T`, `[k, n]`, orthonormal rows.
    pub vt: Matrix,
}

impl Svd {
    /// `U diag(s) V^T`.
    pub fn reconstruct(&self) -> Matrix {
        let mut us = self.u.clone();
        for i in 0..us.rows {
            for (j, s) in self.s.iter().enumerate() {
                us.data[i * us.cols + j] *= s;
            }
        }
        us.matmul(&self.vt)
    }

    /// The leading `r` singular triplets (all of them when `r` is larger).
    pub fn truncate(&self, r: usize) -> Self {
        let r = r.min(self.s.len());
        Self {
            u: self.u.columns(0, r),
            s: self.s[..r].to_vec(),
            vt: self.vt.row_range(0, r),
        }
    }
}

fn dot(a: &[f64], b: &[f64]) -> f64 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// One-sided Jacobi on the columns of a tall (`m >= n`) matrix given as columns. Returns
/// the orthogonalised columns (`U diag(s)`) and `V` as columns.
fn jacobi_columns(mut cols: Vec<Vec<f64>>) -> (Vec<Vec<f64>>, Vec<Vec<f64>>) {
    let n = cols.len();
    let mut v: Vec<Vec<f64>> = (0..n)
        .map(|j| {
            let mut e = vec![0.0; n];
            e[j] = 1.0;
            e
        })
        .collect();
    let eps = f64::EPSILON;
    for _sweep in 0..80 {
        let mut rotated = false;
        for p in 0..n {
            for q in p + 1..n {
                let alpha = dot(&cols[p], &cols[p]);
                let beta = dot(&cols[q], &cols[q]);
                let gamma = dot(&cols[p], &cols[q]);
                if gamma == 0.0 || gamma.abs() <= eps * (alpha * beta).sqrt() {
                    continue;
                }
                rotated = true;
                let zeta = (beta - alpha) / (2.0 * gamma);
                let t = zeta.signum() / (zeta.abs() + (1.0 + zeta * zeta).sqrt());
                let c = 1.0 / (1.0 + t * t).sqrt();
                let s = c * t;
                let (lo, hi) = cols.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (a, b) = (*x, *y);
                    *x = c * a - s * b;
                    *y = s * a + c * b;
                }
                let (lo, hi) = v.split_at_mut(q);
                for (x, y) in lo[p].iter_mut().zip(hi[0].iter_mut()) {
                    let (a, b) = (*x, *y);
                    *x = c * a - s * b;
                    *y = s * a + c * b;
                }
            }
        }
        if !rotated {
            break;
        }
    }
    (cols, v)
}

/// Completes `cols` (orthonormal or zero vectors of length `m`) to orthonormal vectors:
/// each zero vector is replaced by a unit vector orthogonal to all the others.
fn complete_orthonormal(cols: &mut [Vec<f64>], m: usize) {
    for j in 0..cols.len() {
        if cols[j].iter().any(|&x| x != 0.0) {
            continue;
        }
        for e in 0..m {
            let mut c = vec![0.0; m];
            c[e] = 1.0;
            // Twice, for numerical orthogonality.
            for _ in 0..2 {
                for (k, other) in cols.iter().enumerate() {
                    if k == j {
                        continue;
                    }
                    let d = dot(&c, other);
                    for (x, o) in c.iter_mut().zip(other) {
                        *x -= d * o;
                    }
                }
            }
            let norm = dot(&c, &c).sqrt();
            if norm > 1e-8 {
                cols[j] = c.iter().map(|x| x / norm).collect();
                break;
            }
        }
    }
}

/// The thin SVD of a tall-or-square matrix given by columns.
fn svd_tall(a: &Matrix) -> Svd {
    let (m, n) = (a.rows, a.cols);
    let (cols, v) = jacobi_columns(a.column_vecs());
    let mut s: Vec<f64> = cols.iter().map(|c| dot(c, c).sqrt()).collect();
    let smax = s.iter().copied().fold(0.0, f64::max);
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&i, &j| s[j].total_cmp(&s[i]));
    let tiny = smax * f64::EPSILON * (m.max(n) as f64);
    let mut u_cols = Vec::with_capacity(n);
    let mut v_cols = Vec::with_capacity(n);
    let mut sorted = Vec::with_capacity(n);
    for &j in &order {
        let sj = s[j];
        if sj > tiny && sj > 0.0 {
            u_cols.push(cols[j].iter().map(|x| x / sj).collect::<Vec<_>>());
            sorted.push(sj);
        } else {
            u_cols.push(vec![0.0; m]);
            sorted.push(0.0);
        }
        v_cols.push(v[j].clone());
    }
    complete_orthonormal(&mut u_cols, m);
    s = sorted;
    Svd {
        u: Matrix::from_column_vecs(m, &u_cols),
        s,
        vt: Matrix::from_column_vecs(n, &v_cols).transpose(),
    }
}

/// The thin SVD `A = U diag(s) V^T` of an `[m, n]` matrix: `U` is `[m, k]`, `V^T` is
/// `[k, n]`, `k = min(m, n)`, singular values descending. Singular vectors of zero singular
/// values are completed to an orthonormal set. Signs of singular-vector pairs are
/// arbitrary, as in every SVD.
pub fn svd(a: &Matrix) -> Svd {
    if a.rows >= a.cols {
        svd_tall(a)
    } else {
        // A^T = U' S V'^T  =>  A = V' S U'^T.
        let t = svd_tall(&a.transpose());
        Svd {
            u: t.vt.transpose(),
            s: t.s,
            vt: t.u.transpose(),
        }
    }
}

/// The thin SVD of the product `B A` (`B`: `[m, r]`, `A`: `[r, n]`) without forming it:
/// `U` is `[m, k]`, `V^T` is `[k, n]` with `k = min(r, m, n)`. Every singular value of
/// `B A` beyond `k` is zero.
pub fn svd_of_product(b: &Matrix, a: &Matrix) -> Svd {
    // B = U1 S1 V1^T; B A = U1 C with C = S1 V1^T A ([k1, n]); C = U2 S2 V2^T;
    // B A = (U1 U2) S2 V2^T.
    let d1 = svd(b);
    let mut c = d1.vt.matmul(a);
    for (i, s) in d1.s.iter().enumerate() {
        for j in 0..c.cols {
            c.data[i * c.cols + j] *= s;
        }
    }
    let d2 = svd(&c);
    Svd {
        u: d1.u.matmul(&d2.u),
        s: d2.s,
        vt: d2.vt,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // tests
mod tests {
    use super::*;

    /// A deterministic pseudo-random matrix (xorshift), values in [-1, 1).
    fn random(rows: usize, cols: usize, seed: u64) -> Matrix {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        let data = (0..rows * cols)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 11) as f64 / (1u64 << 52) as f64 - 1.0
            })
            .collect();
        Matrix::new(rows, cols, data)
    }

    fn check(a: &Matrix, d: &Svd, tol: f64) {
        let k = a.rows.min(a.cols);
        assert_eq!((d.u.rows, d.u.cols), (a.rows, k));
        assert_eq!((d.vt.rows, d.vt.cols), (k, a.cols));
        assert!(d.reconstruct().max_abs_diff(a) < tol, "U S V^T != A");
        assert!(
            d.u.transpose()
                .matmul(&d.u)
                .max_abs_diff(&Matrix::identity(k))
                < tol,
            "U^T U != I"
        );
        assert!(
            d.vt.matmul(&d.vt.transpose())
                .max_abs_diff(&Matrix::identity(k))
                < tol,
            "V^T V != I"
        );
        assert!(d.s.windows(2).all(|w| w[0] >= w[1]), "not descending");
        assert!(d.s.iter().all(|&s| s >= 0.0));
    }

    #[test]
    fn known_singular_values() {
        // [[3, 0], [4, 5]]: A^T A = [[25, 20], [20, 25]], eigenvalues 45 and 5.
        let d = svd(&Matrix::new(2, 2, vec![3.0, 0.0, 4.0, 5.0]));
        assert!((d.s[0] - 45f64.sqrt()).abs() < 1e-13);
        assert!((d.s[1] - 5f64.sqrt()).abs() < 1e-13);
        // A diagonal matrix: its absolute diagonal, sorted.
        let d = svd(&Matrix::new(
            3,
            3,
            vec![0.5, 0.0, 0.0, 0.0, -7.0, 0.0, 0.0, 0.0, 2.0],
        ));
        assert_eq!(d.s, vec![7.0, 2.0, 0.5]);
        // A rank-one matrix u v^T with |u| = 3 (1,2,2), |v| = 5 (3,4): s = [15, 0].
        let a = Matrix::new(3, 2, vec![3.0, 4.0, 6.0, 8.0, 6.0, 8.0]);
        let d = svd(&a);
        assert!((d.s[0] - 15.0).abs() < 1e-12 && d.s[1].abs() < 1e-12);
        check(&a, &d, 1e-12);
    }

    #[test]
    fn random_tall_wide_and_square() {
        for (i, &(m, n)) in [(1, 1), (5, 3), (3, 5), (8, 8), (40, 17), (17, 64), (1, 9)]
            .iter()
            .enumerate()
        {
            let a = random(m, n, i as u64 + 1);
            check(&a, &svd(&a), 1e-11);
        }
    }

    #[test]
    fn rank_deficient_and_zero() {
        let b = random(12, 3, 7);
        let c = random(3, 9, 8);
        let a = b.matmul(&c); // rank 3
        let d = svd(&a);
        check(&a, &d, 1e-11);
        assert!(d.s[3..].iter().all(|&s| s < 1e-12));
        let z = Matrix::zeros(4, 3);
        let d = svd(&z);
        check(&z, &d, 1e-12);
        assert_eq!(d.s, vec![0.0; 3]);
    }

    #[test]
    fn product_matches_the_formed_matrix() {
        let b = random(20, 5, 3);
        let a = random(5, 31, 4);
        let formed = svd(&b.matmul(&a));
        let product = svd_of_product(&b, &a);
        assert_eq!(product.s.len(), 5);
        assert!(product.reconstruct().max_abs_diff(&b.matmul(&a)) < 1e-11);
        for (x, y) in product.s.iter().zip(&formed.s) {
            assert!((x - y).abs() < 1e-11);
        }
        assert!(formed.s[5..].iter().all(|&s| s < 1e-11));
        // Truncation keeps the best rank-2 approximation: the error is the third value.
        let t = product.truncate(2).reconstruct();
        let err = t.max_abs_diff(&b.matmul(&a));
        assert!(err <= product.s[2] + 1e-12);
    }

    #[test]
    fn tensor_data_round_trip() {
        let data = TensorData::new(vec![1.0f32, 2.0, 3.0, 4.0, 5.0, 6.0], [2, 3]);
        let m = Matrix::from_tensor_data(&data).unwrap();
        assert_eq!(m.get(1, 0), 4.0);
        assert_eq!(m.to_tensor_data(), data);
        assert!(Matrix::from_tensor_data(&TensorData::new(vec![1.0f32], [1])).is_err());
    }
}
