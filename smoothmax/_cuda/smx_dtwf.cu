// DTW_Ω between feature sequences on the GPU, the cost of a cell computed when
// it is visited (the CUDA text of smoothmax/_core/dtwf.pyx; docs/gpu.md).
//
// The strip pipeline of smx_dtw.cu (one warp per strip of 32 rows, lane r on
// row 32*s + r, anti-diagonal steps, strips chained through published rows)
// run over one *segment* of nseg strips per launch, s = s0 .. s0 + nseg - 1,
// so that memory stays linear in the lengths: the host chains segments.
//   edge (B, nseg + 1, NB): slot 0 is the input of the segment (forward: the
//     R row above it; backward: the products ebar·q sent up by the segment
//     below), slot ls + 1 (forward) / ls (backward) what local strip ls
//     publishes; the host presets the progress counter of the input slot.
//   sync: [0] the ticket counter, [1 + b*(nseg+1) + slot] progress per slot.
// The forward with MODE 1 stores two weights of each cell of the segment,
// (q_up, q_left) (layout of smx_dtw.cu's gradient; the backward derives
// q_diag with smx::dtw_q_diag); the backward pulls ebar through them and, instead
// of writing E, adds ebar·∂c/∂x to grad_x (row i belongs to one lane) and
// ebar·∂c/∂y to grad_y with atomics (a column is shared by every row).
//
// COST: 0 squared Euclidean, 1 Euclidean (gradient 0 where x = y), 2 cosine
// on rows normalised by the host (gradient: the raw sums, scaled by the host
// by -1/|row|), as in smoothmax/_core/costs.h.

template <typename T, int COST>
SMX_DEVICE T smx_feat_cost(const T* __restrict__ x, const T* __restrict__ y, int d)
{
    T acc = T(0);
    for (int k = 0; k < d; ++k) {
        const T t = COST == 2 ? x[k] * y[k] : (x[k] - y[k]) * (x[k] - y[k]);
        acc += t;
    }
    return COST == 2 ? T(1) - acc : (COST == 1 ? sqrt(acc) : acc);
}

template <typename T, int COST>
SMX_DEVICE void smx_feat_grad(T e, const T* __restrict__ x, const T* __restrict__ y, int d,
                              T* __restrict__ gx, T* gy)
{
    // cosine: s = <x, y>, adds e(y - s x), e(x - s y); (sq)Euclidean: w(x - y), -w(x - y)
    T w = T(2) * e, s = T(0);
    if (COST != 0) {
        for (int k = 0; k < d; ++k) s += COST == 2 ? x[k] * y[k] : (x[k] - y[k]) * (x[k] - y[k]);
        if (COST == 1) {
            if (!(s > T(0))) return;
            w = e / sqrt(s);
        }
    }
    for (int k = 0; k < d; ++k) {
        if (COST == 2) {
            gx[k] += e * (y[k] - s * x[k]);
            smx_atomic_add(gy + k, e * (x[k] - s * y[k]));
        } else {
            const T t = w * (x[k] - y[k]);
            gx[k] += t;
            smx_atomic_add(gy + k, -t);
        }
    }
}

template <typename T, int REG, int COST, int MODE>
SMX_GLOBAL void smx_dtwf_fwd(const T* __restrict__ X, const T* __restrict__ Y,
                             const long long* __restrict__ la, const long long* __restrict__ lb,
                             int B, int NA, int NB, int d, int band, T gamma, int s0, int nseg,
                             T* __restrict__ value, T* __restrict__ qbuf, T* edge, int* sync)
{
    const T inf = smx_inf<T>();
    const T inv_gamma = T(1) / gamma;
    const int lane = threadIdx.x;
    const int ticket = smx_strip_ticket(sync);
    const int ls = ticket / B, b = ticket - (ticket / B) * B;
    const int s = s0 + ls;
    const int n = (int)la[b], m = (int)lb[b];
    if (32 * s >= n) return;                       // uniform over the warp
    const int i = 32 * s + lane;
    const int ra = smx::min2(31, n - 1 - 32 * s);
    const bool active = lane <= ra;
    const bool reads_edge = (lane == 0) && (s > 0);
    const bool writes_edge = (lane == 31) && (i + 1 < n);
    const int nslot = nseg + 1;
    int* prog_above = sync + 1 + b * nslot + ls;
    int* prog_mine = sync + 1 + b * nslot + ls + 1;
    const T* edge_above = edge + ((smx_size)b * nslot + ls) * NB;
    T* edge_mine = edge + ((smx_size)b * nslot + ls + 1) * NB;
    const T* xrow = X + ((smx_size)b * NA + (smx_size)(active ? i : 0)) * d;
    const T* ybase = Y + (smx_size)b * NB * d;
    const smx_size NSTEP = (smx_size)NB + 31;
    T* q_strip = (MODE >= 1) ? qbuf + ((smx_size)b * nseg + ls) * NSTEP * 64 : nullptr;

    T out = inf;
    T up_prev = (s == 0 && lane == 0) ? T(0) : inf;   // R[-1][-1] = 0 is the corner
    int avail = 0;
    const int nstep = m + ra;
    for (int t = 0; t < nstep; ++t) {
        T up = smx_shfl_up(out, 1);
        const int j = t - lane;
        const bool in = active && j >= 0 && j < m;
        if (lane == 0) {
            up = inf;
            if (reads_edge && in) {
                if (j >= avail) {
                    while ((avail = smx_ld_acquire(prog_above)) <= j) { }
                }
                up = smx_ldcg(edge_above + j);
            }
        }
        const T diag = up_prev;
        up_prev = up;
        const T left = out;
        T R = inf, q0 = T(0), q1 = T(0), q2 = T(0);
        if (in) {
            if (smx_in_band(i, j, n, m, band)) {
                const T th = smx_feat_cost<T, COST>(xrow, ybase + (smx_size)j * d, d);
                const T mx = smx::max3<T, REG>(-up, -left, -diag, gamma, inv_gamma, q0, q1, q2);
                R = th - mx;
                if (!(R < inf)) { R = inf; q0 = q1 = q2 = T(0); }
            }
            if (MODE >= 1) {
                T* qp = q_strip + (smx_size)t * 64 + lane;
                qp[0] = q0; qp[32] = smx::dtw_stored_left(q0, q1, q2);
            }
            if (writes_edge) {
                edge_mine[j] = R;
                if ((j + 1) % SMX_PUB == 0 || j == m - 1) smx_st_release(prog_mine, j + 1);
            }
            if (i == n - 1 && j == m - 1) value[b] = R;
        }
        out = R;
    }
}

template <typename T, int REG, int COST>
SMX_GLOBAL void smx_dtwf_bwd(const T* __restrict__ X, const T* __restrict__ Y,
                             const long long* __restrict__ la, const long long* __restrict__ lb,
                             int B, int NA, int NB, int d, int s0, int nseg,
                             const T* __restrict__ value, const T* __restrict__ qbuf,
                             T* __restrict__ gx, T* gy, T* edge, int* sync)
{
    const int lane = threadIdx.x;
    const int ticket = smx_strip_ticket(sync);
    const int ls = nseg - 1 - ticket / B, b = ticket - (ticket / B) * B;
    const int s = s0 + ls;
    const int n = (int)la[b], m = (int)lb[b];
    if (32 * s >= n) return;
    const int i = 32 * s + lane;
    const int ra = smx::min2(31, n - 1 - 32 * s);
    const bool active = lane <= ra;
    const bool reads_edge = (lane == 31) && (i + 1 < n);
    const bool writes_edge = (lane == 0) && (s > 0);
    const int nslot = nseg + 1;
    int* prog_below = sync + 1 + b * nslot + ls + 1;
    int* prog_mine = sync + 1 + b * nslot + ls;
    const T* edge_below = edge + ((smx_size)b * nslot + ls + 1) * NB;
    T* edge_mine = edge + ((smx_size)b * nslot + ls) * NB;
    const smx_size NSTEP = (smx_size)NB + 31;
    const T* q_strip = qbuf + ((smx_size)b * nseg + ls) * NSTEP * 64;
    const smx_size row = (smx_size)b * NA + (smx_size)(active ? i : 0);
    const T* xrow = X + row * d;
    T* gxrow = gx + row * d;
    const T* ybase = Y + (smx_size)b * NB * d;
    T* gybase = gy + (smx_size)b * NB * d;
    const T seed = smx_isfinite(value[b]) ? T(1) : T(0);

    T outU = T(0), outD = T(0);
    T dsave = T(0), carry = T(0), pend = T(0);
    int avail = 0;
    const int nstep = m + ra;
    for (int t = 0; t < nstep; ++t) {
        T inU = smx_shfl_down(outU, 1);
        T inD = smx_shfl_down(outD, 1);
        const int j = m - 1 - t + (ra - lane);
        const bool in = active && j >= 0 && j < m;
        if (lane == ra) {
            inU = T(0); inD = T(0);
            if (reads_edge && in) {
                if (m - j > avail) {
                    while ((avail = smx_ld_acquire(prog_below)) < m - j) { }
                }
                inU = smx_ldcg(edge_below + j);
            }
        }
        const T D = dsave;
        dsave = inD;
        outU = T(0); outD = T(0);
        if (in) {
            const T eb = (i == n - 1 && j == m - 1) ? seed : carry + inU + D;
            const T* qp = q_strip + (smx_size)(j + lane) * 64 + lane;
            outU = eb * qp[0]; carry = eb * qp[32]; outD = eb * smx::dtw_q_diag(qp[0], qp[32]);
            if (eb != T(0))
                smx_feat_grad<T, COST>(eb, xrow, ybase + (smx_size)j * d, d, gxrow, gybase + (smx_size)j * d);
            if (writes_edge) {
                edge_mine[j] = outU + pend;
                pend = outD;
                const int done = m - j;
                if (done % SMX_PUB == 0 || j == 0) smx_st_release(prog_mine, done);
            }
        } else {
            carry = T(0);
        }
    }
}
