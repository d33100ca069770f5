//! Host kernels for the products of a low-rank update with a small rank `r` (16, 32 or 64):
//! `[rows, in] x [in, r]`, `[rows, r] x [r, out]` and the weight gradients, sums over rows
//! of `[r] x [n]` outer products. The general `gemm` runs these narrow shapes at a fraction
//! of its speed and on one thread (it splits along the narrow side); here the rows or
//! columns are split over rayon's pool and each block keeps its partial results in AVX-512
//! registers. Without AVX-512 (checked at run time), or for other ranks, the callers take the
//! general product.

use rayon::prelude::*;

/// Rows per rayon task of the row-parallel kernels.
const ROWS_PER_TASK: usize = 32;
/// Columns per block of [`outer_t`]: one vector.
const OUTER_COLS: usize = 16;

/// Whether the kernels here run for rank `r` on this CPU.
pub(crate) fn supported(r: usize) -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        matches!(r, 16 | 32 | 64) && std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = r;
        false
    }
}

/// `t = alpha x a`: `x` `[rows, n]` (row stride `x_rs`, unit column stride), `a` `[n, r]`
/// row-major, `t` `[rows, r]`.
///
/// # Panics
/// Where [`supported`] is false, or the slices are too short for the shapes.
pub(crate) fn narrow(
    x: &[f32],
    x_rs: usize,
    rows: usize,
    n: usize,
    a: &[f32],
    r: usize,
    alpha: f32,
) -> Vec<f32> {
    assert!(supported(r), "no rank kernel for r = {r} on this CPU");
    assert!(a.len() >= n * r, "narrow: a is too short");
    assert!(
        rows == 0 || x.len() >= (rows - 1) * x_rs + n,
        "narrow: x is too short"
    );
    let mut t = vec![0.0f32; rows * r];
    t.par_chunks_mut(ROWS_PER_TASK * r)
        .enumerate()
        .for_each(|(task, t)| {
            let x = &x[task * ROWS_PER_TASK * x_rs..];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `supported` checked that the CPU has AVX-512F; the bounds the kernel
            // relies on are the asserts above, restricted to this task's rows.
            #[allow(unsafe_code)]
            unsafe {
                match r {
                    16 => avx512::narrow::<1>(x, x_rs, n, a, alpha, t),
                    32 => avx512::narrow::<2>(x, x_rs, n, a, alpha, t),
                    _ => avx512::narrow::<4>(x, x_rs, n, a, alpha, t),
                }
            }
        });
    t
}

/// `y (+)= alpha t b`: `t` `[rows, r]` row-major, `b` `[r, out]` row-major, `y`
/// `[rows, out]` row-major (added to when `accumulate`).
///
/// # Panics
/// Where [`supported`] is false, or the slices are too short for the shapes.
pub(crate) fn widen(
    t: &[f32],
    r: usize,
    b: &[f32],
    out: usize,
    alpha: f32,
    y: &mut [f32],
    accumulate: bool,
) {
    assert!(supported(r), "no rank kernel for r = {r} on this CPU");
    let rows = y.len() / out.max(1);
    assert!(
        b.len() >= r * out && t.len() >= rows * r,
        "widen: operands too short"
    );
    y.par_chunks_mut(ROWS_PER_TASK * out)
        .enumerate()
        .for_each(|(task, y)| {
            let t = &t[task * ROWS_PER_TASK * r..];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `narrow`.
            #[allow(unsafe_code)]
            unsafe {
                avx512::widen(t, r, b, out, alpha, y, accumulate);
            }
        });
}

/// `g = alpha u^T x`, `[r, n]`: the sum over rows of `u[row, :]^T x[row, :]` for `u`
/// `[rows, r]` row-major and `x` `[rows, n]` (row stride `x_rs`, unit column stride).
///
/// # Panics
/// Where [`supported`] is false, or the slices are too short for the shapes.
pub(crate) fn outer_t(
    u: &[f32],
    r: usize,
    x: &[f32],
    x_rs: usize,
    rows: usize,
    n: usize,
    alpha: f32,
) -> Vec<f32> {
    assert!(supported(r), "no rank kernel for r = {r} on this CPU");
    assert!(u.len() >= rows * r, "outer: u is too short");
    assert!(
        rows == 0 || x.len() >= (rows - 1) * x_rs + n,
        "outer: x is too short"
    );
    let blocks = n.div_ceil(OUTER_COLS);
    let parts: Vec<Vec<f32>> = (0..blocks)
        .into_par_iter()
        .map(|blk| {
            let mut part = vec![0.0f32; r * OUTER_COLS];
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as in `narrow`; the kernel masks the columns past `n`.
            #[allow(unsafe_code)]
            unsafe {
                avx512::outer_t(u, r, x, x_rs, rows, blk * OUTER_COLS, n, alpha, &mut part);
            }
            part
        })
        .collect();
    let mut g = vec![0.0f32; r * n];
    for (blk, part) in parts.iter().enumerate() {
        let c0 = blk * OUTER_COLS;
        let w = OUTER_COLS.min(n - c0);
        for j in 0..r {
            g[j * n + c0..j * n + c0 + w].copy_from_slice(&part[j * OUTER_COLS..][..w]);
        }
    }
    g
}

/// `a^T` for `a` `[n, r]` row-major: `[r, n]`.
pub(crate) fn transpose(a: &[f32], n: usize, r: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; n * r];
    for (i, row) in a.chunks_exact(r).take(n).enumerate() {
        for (j, &v) in row.iter().enumerate() {
            t[j * n + i] = v;
        }
    }
    t
}

#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)] // AVX-512 loads and stores through raw pointers, bounds noted at each
#[allow(clippy::needless_range_loop)] // the loops index several register arrays in step
mod avx512 {
    use std::arch::x86_64::*;

    /// Rows that share each load of `a` in [`narrow`].
    const ROW_BLOCK: usize = 4;

    /// The lanes of the 16 columns from `c` on that lie before `end`.
    fn lanes(c: usize, end: usize) -> __mmask16 {
        let w = end.saturating_sub(c).min(16);
        ((1u32 << w) - 1) as __mmask16
    }

    /// `t = alpha x a` for the rows of `t` (`[rows, 16 NV]`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `a` holds `n * 16 NV` values; `x` holds row `rows - 1` up to
    /// column `n`, rows `x_rs` apart.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn narrow<const NV: usize>(
        x: &[f32],
        x_rs: usize,
        n: usize,
        a: &[f32],
        alpha: f32,
        t: &mut [f32],
    ) {
        let r = 16 * NV;
        let rows = t.len() / r;
        let al = _mm512_set1_ps(alpha);
        let mut row = 0;
        while row < rows {
            let qn = ROW_BLOCK.min(rows - row);
            // Rows past the end repeat the last row; their sums are not stored.
            let xr: [&[f32]; ROW_BLOCK] =
                std::array::from_fn(|q| &x[(row + q.min(qn - 1)) * x_rs..][..n]);
            let mut acc = [[_mm512_setzero_ps(); NV]; ROW_BLOCK];
            for i in 0..n {
                // SAFETY: i < n, so i * r + 16 v + 15 < n * r <= a.len().
                let av: [__m512; NV] = std::array::from_fn(|v| unsafe {
                    _mm512_loadu_ps(a.as_ptr().add(i * r + 16 * v))
                });
                for q in 0..ROW_BLOCK {
                    let xv = _mm512_set1_ps(xr[q][i]);
                    for v in 0..NV {
                        acc[q][v] = _mm512_fmadd_ps(xv, av[v], acc[q][v]);
                    }
                }
            }
            for q in 0..qn {
                for v in 0..NV {
                    let dst = &mut t[(row + q) * r + 16 * v..][..16];
                    // SAFETY: `dst` is 16 values.
                    unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(al, acc[q][v])) };
                }
            }
            row += qn;
        }
    }

    /// `y (+)= alpha t b` for the rows of `y` (`[rows, out]`).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `t` holds `rows * r` values and `b` `r * out`.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn widen(
        t: &[f32],
        r: usize,
        b: &[f32],
        out: usize,
        alpha: f32,
        y: &mut [f32],
        accumulate: bool,
    ) {
        const QB: usize = 4;
        const NV: usize = 4;
        let rows = y.len() / out;
        let mut row = 0;
        while row < rows {
            let qn = QB.min(rows - row);
            let tr: [&[f32]; QB] = std::array::from_fn(|q| &t[(row + q.min(qn - 1)) * r..][..r]);
            let mut c0 = 0;
            while c0 < out {
                let masks: [__mmask16; NV] = std::array::from_fn(|v| lanes(c0 + 16 * v, out));
                let mut acc = [[_mm512_setzero_ps(); NV]; QB];
                for j in 0..r {
                    let bj = &b[j * out..(j + 1) * out];
                    // SAFETY: masked loads read only the lanes before `out`, inside `bj`.
                    let bv: [__m512; NV] = std::array::from_fn(|v| unsafe {
                        _mm512_maskz_loadu_ps(masks[v], bj.as_ptr().wrapping_add(c0 + 16 * v))
                    });
                    for q in 0..QB {
                        let tv = _mm512_set1_ps(alpha * tr[q][j]);
                        for v in 0..NV {
                            acc[q][v] = _mm512_fmadd_ps(tv, bv[v], acc[q][v]);
                        }
                    }
                }
                for q in 0..qn {
                    let yr = &mut y[(row + q) * out..(row + q + 1) * out];
                    for v in 0..NV {
                        let p = yr.as_mut_ptr().wrapping_add(c0 + 16 * v);
                        // SAFETY: masked accesses touch only the lanes before `out`, inside
                        // this row of `y`.
                        unsafe {
                            let s = if accumulate {
                                _mm512_add_ps(_mm512_maskz_loadu_ps(masks[v], p), acc[q][v])
                            } else {
                                acc[q][v]
                            };
                            _mm512_mask_storeu_ps(p, masks[v], s);
                        }
                    }
                }
                c0 += 16 * NV;
            }
            row += qn;
        }
    }

    /// `part = alpha u^T x[:, c0..c0 + 16]`, `[r, 16]` (columns past `n` are zero).
    ///
    /// # Safety
    /// The CPU has AVX-512F; `u` holds `rows * r` values, `x` row `rows - 1` up to column
    /// `n`, rows `x_rs` apart; `part` holds `r * 16`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn outer_t(
        u: &[f32],
        r: usize,
        x: &[f32],
        x_rs: usize,
        rows: usize,
        c0: usize,
        n: usize,
        alpha: f32,
        part: &mut [f32],
    ) {
        const JB: usize = 16;
        let mask = lanes(c0, n);
        let al = _mm512_set1_ps(alpha);
        let mut j0 = 0;
        while j0 < r {
            let mut acc = [_mm512_setzero_ps(); JB];
            for row in 0..rows {
                let xr = &x[row * x_rs..row * x_rs + n];
                // SAFETY: the masked load reads only the columns before `n`, inside `xr`.
                let xv = unsafe { _mm512_maskz_loadu_ps(mask, xr.as_ptr().wrapping_add(c0)) };
                let ur = &u[row * r + j0..row * r + j0 + JB];
                for jj in 0..JB {
                    acc[jj] = _mm512_fmadd_ps(_mm512_set1_ps(ur[jj]), xv, acc[jj]);
                }
            }
            for jj in 0..JB {
                let dst = &mut part[(j0 + jj) * 16..][..16];
                // SAFETY: `dst` is 16 values.
                unsafe { _mm512_storeu_ps(dst.as_mut_ptr(), _mm512_mul_ps(al, acc[jj])) };
            }
            j0 += JB;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u32) -> Vec<f32> {
        (0..n as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) % 1000) as f32 / 500.0 - 1.0)
            .collect()
    }

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f64> {
        let mut c = vec![0.0f64; m * n];
        for i in 0..m {
            for l in 0..k {
                for j in 0..n {
                    c[i * n + j] += f64::from(a[i * k + l]) * f64::from(b[l * n + j]);
                }
            }
        }
        c
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (f64::from(*g) - w).abs() < 1e-4 * (1.0 + w.abs()),
                "{what}: element {i} is {g}, want {w}"
            );
        }
    }

    #[test]
    fn kernels_match_a_plain_product() {
        if !supported(16) {
            println!("no AVX-512 here: the rank kernels are not used, nothing to check");
            return;
        }
        // Row counts that leave partial row blocks and tasks; widths that leave partial
        // vectors; a row stride wider than the rows.
        for &(rows, n, r, out, x_rs) in &[
            (70, 37, 16, 150, 40),
            (5, 8, 32, 3, 8),
            (33, 64, 64, 65, 64),
            (1, 1, 16, 1, 1),
        ] {
            let x = data((rows - 1) * x_rs + n, 1);
            let xd: Vec<f32> = (0..rows)
                .flat_map(|i| x[i * x_rs..i * x_rs + n].to_vec())
                .collect();
            let a = data(n * r, 2);
            let b = data(r * out, 3);
            let case = format!("rows {rows}, n {n}, r {r}, out {out}");
            let t = narrow(&x, x_rs, rows, n, &a, r, 0.5);
            let want: Vec<f64> = naive(&xd, &a, rows, n, r).iter().map(|v| v * 0.5).collect();
            close(&t, &want, &format!("{case}: narrow"));
            let y0 = data(rows * out, 4);
            let mut y = y0.clone();
            widen(&t, r, &b, out, 2.0, &mut y, true);
            let want: Vec<f64> = naive(&t, &b, rows, r, out)
                .iter()
                .zip(&y0)
                .map(|(p, &y)| f64::from(y) + 2.0 * p)
                .collect();
            close(&y, &want, &format!("{case}: widen, accumulating"));
            let mut y = vec![7.0f32; rows * out];
            widen(&t, r, &b, out, 1.0, &mut y, false);
            close(&y, &naive(&t, &b, rows, r, out), &format!("{case}: widen"));
            let g = outer_t(&t, r, &x, x_rs, rows, n, 3.0);
            let tt = transpose(&t, rows, r);
            let want: Vec<f64> = naive(&tt, &xd, r, rows, n)
                .iter()
                .map(|v| v * 3.0)
                .collect();
            close(&g, &want, &format!("{case}: outer"));
        }
    }

    #[test]
    fn transpose_swaps_the_axes() {
        let a: Vec<f32> = (0..6).map(|v| v as f32).collect();
        assert_eq!(transpose(&a, 2, 3), vec![0.0, 3.0, 1.0, 4.0, 2.0, 5.0]);
    }
}
