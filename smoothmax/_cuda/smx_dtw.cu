// DTW_Ω on the GPU: strip-pipelined anti-diagonal wavefront (docs/gpu.md).
//
// A block is one warp and owns a strip of 32 consecutive rows of one problem;
// lane r owns row i = 32*s + r. At step t, lane r handles column j = t - r
// (forward), so the 32 lanes sweep an anti-diagonal; R(i-1, j) comes from
// lane r-1 by a warp shuffle, R(i, j-1) stays in the lane's register.
// Strips of one problem run concurrently as a pipeline: the bottom lane of
// strip s publishes its R row in global memory (`edge`) and, every SMX_PUB
// columns, a progress counter with release semantics; lane 0 of strip s+1
// reads it with acquire semantics. Strips take their index from an atomic
// ticket in start order, so a block only ever waits on blocks that already
// run: no deadlock whatever the residency (the decoupled look-back idea).
// There is no length cap and a long problem occupies NA/32 SMs.
//
// The backward pass runs the same pipeline bottom-up and right-to-left on the
// adjoints ebar (E = ebar). The forward of grad/hvp stores the local weights q
// in a lane-coalesced internal layout q[((strip*NSTEP + t)*K + k)*32 + lane],
// NSTEP = NB + 31: the gradient K = 2 of them, (q_up, q_left), the backward
// taking q_diag = 1 - q_up - q_left (smx::dtw_q_diag, the CPU core's rule,
// exact zeros kept); the HVP all K = 3, and their tangents qdot in a second
// buffer of the same layout.
//
// MODE: 0 value only, 1 value and q (gradient), 2 value, q and qdot (HVP).

// Weights kept per cell by a MODE (the layout's K).
template <int MODE> SMX_DEVICE constexpr int smx_dtw_kept() { return MODE == 2 ? 3 : 2; }

#define SMX_PUB 16

SMX_DEVICE bool smx_in_band(int i, int j, int n, int m, int band)
{
    if (band < 0) return true;
    if (i == n - 1 && j == m - 1) return true;
    if (n <= m) return j >= i - band && j <= i + (m - n) + band;
    return i >= j - band && i <= j + (n - m) + band;
}

// The strip a warp takes: tickets in the order warps start, the same on every lane.
SMX_DEVICE int smx_strip_ticket(int* sync)
{
    int ticket = 0;
    if (threadIdx.x == 0) ticket = smx_atomic_add_int(sync, 1);
    return smx_shfl_idx(ticket, 0);
}

template <typename T, int REG, int MODE>
SMX_GLOBAL void smx_dtw_fwd(const T* __restrict__ theta, const T* __restrict__ Z,
                            const long long* __restrict__ la, const long long* __restrict__ lb,
                            int B, int NA, int NB, int band, T gamma, int nstrips,
                            T* __restrict__ value, T* __restrict__ qbuf, T* __restrict__ qdbuf,
                            T* edge, T* edged, int* sync)
{
    const T inf = smx_inf<T>();
    const T inv_gamma = T(1) / gamma;
    const int lane = threadIdx.x;
    const int ticket = smx_strip_ticket(sync);
    const int s = ticket / B, b = ticket - (ticket / B) * B;
    const int n = (int)la[b], m = (int)lb[b];
    if (32 * s >= n) return;                       // uniform over the warp
    const int i = 32 * s + lane;
    const int ra = smx::min2(31, n - 1 - 32 * s);    // last active lane
    const bool active = lane <= ra;
    const bool reads_edge = (lane == 0) && (s > 0);
    const bool writes_edge = (lane == 31) && (i + 1 < n);
    int* prog_above = sync + 1 + b * nstrips + (s - 1);
    int* prog_mine = sync + 1 + b * nstrips + s;
    const T* edge_above = edge + ((smx_size)b * nstrips + (s - 1)) * NB;
    const T* edged_above = edged + ((smx_size)b * nstrips + (s - 1)) * NB;
    T* edge_mine = edge + ((smx_size)b * nstrips + s) * NB;
    T* edged_mine = edged + ((smx_size)b * nstrips + s) * NB;
    const smx_size cell0 = ((smx_size)b * NA + (smx_size)(active ? i : 0)) * NB;
    const T* th_row = theta + cell0;
    const T* z_row = (MODE == 2) ? Z + cell0 : nullptr;
    const smx_size NSTEP = (smx_size)NB + 31;
    constexpr int QS = 32 * smx_dtw_kept<MODE>();    // q values a step
    T* q_strip = (MODE >= 1) ? qbuf + ((smx_size)b * nstrips + s) * NSTEP * QS : nullptr;
    T* qd_strip = (MODE == 2) ? qdbuf + ((smx_size)b * nstrips + s) * NSTEP * QS : nullptr;

    // R_pad[0][0] = 0 is the diagonal predecessor of cell (0, 0)
    T out = inf, outd = T(0);                 // this lane's result of the previous step
    T up_prev = (s == 0 && lane == 0) ? T(0) : inf;   // up value of the previous step = diag now
    T upd_prev = T(0);
    int avail = 0;                            // columns of the strip above known published
    const int nstep = m + ra;                 // steps 0 .. m-1+ra
    for (int t = 0; t < nstep; ++t) {
        T up = smx_shfl_up(out, 1);
        T upd = (MODE == 2) ? smx_shfl_up(outd, 1) : T(0);
        const int j = t - lane;
        const bool in = active && j >= 0 && j < m;
        if (lane == 0) {
            up = inf; upd = T(0);
            if (reads_edge && in) {
                if (j >= avail) {
                    while ((avail = smx_ld_acquire(prog_above)) <= j) { }
                }
                up = smx_ldcg(edge_above + j);
                if (MODE == 2) upd = smx_ldcg(edged_above + j);
            }
        }
        const T diag = up_prev, diagd = upd_prev;
        up_prev = up; upd_prev = upd;
        const T left = out, leftd = outd;
        T R = inf, Rd = T(0);
        T q0 = T(0), q1 = T(0), q2 = T(0);
        T h0 = T(0), h1 = T(0), h2 = T(0);
        if (in) {
            const T th = smx_in_band(i, j, n, m, band) ? th_row[j] : inf;
            if (th < inf) {
                // min_Ω(up, left, diag) = -max_Ω(-up, -left, -diag)
                const T mx = smx::max3<T, REG>(-up, -left, -diag, gamma, inv_gamma, q0, q1, q2);
                R = th - mx;
                if (!(R < inf)) {
                    R = inf; q0 = q1 = q2 = T(0);
                } else if (MODE == 2) {
                    Rd = z_row[j] + smx::hvp3<T, REG>(q0, q1, q2, upd, leftd, diagd, inv_gamma, h0, h1, h2);
                    h0 = -h0; h1 = -h1; h2 = -h2;   // qdot = -H(-r)·rdot for min_Ω
                }
            }
            if (MODE == 1) {
                T* qp = q_strip + (smx_size)t * QS + lane;
                qp[0] = q0; qp[32] = smx::dtw_stored_left(q0, q1, q2);
            } else if (MODE == 2) {
                T* qp = q_strip + (smx_size)t * QS + lane;
                qp[0] = q0; qp[32] = q1; qp[64] = q2;
                T* hp = qd_strip + (smx_size)t * QS + lane;
                hp[0] = h0; hp[32] = h1; hp[64] = h2;
            }
            if (writes_edge) {
                edge_mine[j] = R;
                if (MODE == 2) edged_mine[j] = Rd;
                if ((j + 1) % SMX_PUB == 0 || j == m - 1) smx_st_release(prog_mine, j + 1);
            }
            if (i == n - 1 && j == m - 1) value[b] = R;
        }
        out = R; outd = Rd;
    }
}

// Backward: adjoints ebar (and their directional derivatives for MODE 2).
// Lane r handles column j = m - 1 - t + (ra - r) at reverse step t. The
// contributions of row i+1 to row i are ebar(i+1, j)·q_up(i+1, j) and
// ebar(i+1, j+1)·q_diag(i+1, j+1); lane r+1 sends both by shuffle, the top
// lane of strip s+1 publishes their sum per column in `edge`.
template <typename T, int REG, int MODE>
SMX_GLOBAL void smx_dtw_bwd(const long long* __restrict__ la, const long long* __restrict__ lb,
                            int B, int NA, int NB, int nstrips,
                            const T* __restrict__ value, const T* __restrict__ qbuf,
                            const T* __restrict__ qdbuf,
                            T* __restrict__ E, T* __restrict__ Edot,
                            T* edge, T* edged, int* sync)
{
    const int lane = threadIdx.x;
    const int ticket = smx_strip_ticket(sync);
    const int s = nstrips - 1 - ticket / B, b = ticket - (ticket / B) * B;
    const int n = (int)la[b], m = (int)lb[b];
    const int i = 32 * s + lane;
    // zero what the wavefront does not write: rows >= n, columns >= m
    if (i < NA) {
        T* erow = E + ((smx_size)b * NA + i) * NB;
        T* edrow = (MODE == 2) ? Edot + ((smx_size)b * NA + i) * NB : nullptr;
        for (int j = (i < n ? m : 0); j < NB; ++j) {
            erow[j] = T(0);
            if (MODE == 2) edrow[j] = T(0);
        }
    }
    if (32 * s >= n) return;                       // uniform over the warp
    const int ra = smx::min2(31, n - 1 - 32 * s);
    const bool active = lane <= ra;
    const bool reads_edge = (lane == 31) && (i + 1 < n);
    const bool writes_edge = (lane == 0) && (s > 0);
    int* prog_below = sync + 1 + b * nstrips + (s + 1);
    int* prog_mine = sync + 1 + b * nstrips + s;
    const T* edge_below = edge + ((smx_size)b * nstrips + (s + 1)) * NB;
    const T* edged_below = edged + ((smx_size)b * nstrips + (s + 1)) * NB;
    T* edge_mine = edge + ((smx_size)b * nstrips + s) * NB;
    T* edged_mine = edged + ((smx_size)b * nstrips + s) * NB;
    const smx_size NSTEP = (smx_size)NB + 31;
    constexpr int QS = 32 * smx_dtw_kept<MODE>();
    const T* q_strip = qbuf + ((smx_size)b * nstrips + s) * NSTEP * QS;
    const T* qd_strip = (MODE == 2) ? qdbuf + ((smx_size)b * nstrips + s) * NSTEP * QS : nullptr;
    T* erow = E + ((smx_size)b * NA + (smx_size)(active ? i : 0)) * NB;
    T* edrow = (MODE == 2) ? Edot + ((smx_size)b * NA + (smx_size)(active ? i : 0)) * NB : nullptr;
    const T seed = smx_isfinite(value[b]) ? T(1) : T(0);

    T outU = T(0), outD = T(0), outUd = T(0), outDd = T(0);   // sent to lane - 1
    T dsave = T(0), dsaved = T(0);            // diagonal contribution for the next step
    T carry = T(0), carryd = T(0);            // contribution of (i, j+1) to (i, j)
    T pend = T(0), pendd = T(0);              // publisher: diagonal part for column j-1
    int avail = 0;
    const int nstep = m + ra;
    for (int t = 0; t < nstep; ++t) {
        T inU = smx_shfl_down(outU, 1);
        T inD = smx_shfl_down(outD, 1);
        T inUd = T(0), inDd = T(0);
        if (MODE == 2) { inUd = smx_shfl_down(outUd, 1); inDd = smx_shfl_down(outDd, 1); }
        const int j = m - 1 - t + (ra - lane);
        const bool in = active && j >= 0 && j < m;
        if (lane == ra) {                     // nothing comes from an inactive lane below
            inU = T(0); inD = T(0); inUd = T(0); inDd = T(0);
            if (reads_edge && in) {
                if (m - j > avail) {
                    while ((avail = smx_ld_acquire(prog_below)) < m - j) { }
                }
                inU = smx_ldcg(edge_below + j);     // up and diagonal parts, summed
                if (MODE == 2) inUd = smx_ldcg(edged_below + j);
            }
        }
        const T D = dsave, Dd = dsaved;
        dsave = inD; dsaved = inDd;
        outU = T(0); outD = T(0); outUd = T(0); outDd = T(0);
        if (in) {
            T eb, ebd = T(0);
            if (i == n - 1 && j == m - 1) { eb = seed; }
            else {
                eb = carry + inU + D;
                if (MODE == 2) ebd = carryd + inUd + Dd;
            }
            const T* qp = q_strip + (smx_size)(j + lane) * QS + lane;
            const T q0 = qp[0], q1 = qp[32];
            const T q2 = (MODE == 2) ? qp[64] : smx::dtw_q_diag(q0, q1);
            outU = eb * q0; carry = eb * q1; outD = eb * q2;
            erow[j] = eb;
            if (MODE == 2) {
                const T* hp = qd_strip + (smx_size)(j + lane) * QS + lane;
                outUd = ebd * q0 + eb * hp[0];
                carryd = ebd * q1 + eb * hp[32];
                outDd = ebd * q2 + eb * hp[64];
                edrow[j] = ebd;
            }
            if (writes_edge) {
                edge_mine[j] = outU + pend;
                pend = outD;
                if (MODE == 2) { edged_mine[j] = outUd + pendd; pendd = outDd; }
                const int done = m - j;
                if (done % SMX_PUB == 0 || j == 0) smx_st_release(prog_mine, done);
            }
        } else {
            carry = T(0); carryd = T(0);
        }
    }
}
