// Vit_Ω on the GPU: one block per sequence, one warp per state row.
//
// Step t computes V_t(i) = max_Ω_j(theta[t, i, j] + V_{t-1}(j)) for every
// state i; warp w handles rows i = w, w + nwarps, ...; its lanes stride over
// j (coalesced reads of theta[t, i, :]) and reduce with butterfly shuffles.
// V_{t-1}, V_t (and their tangents, and the adjoints ebar) live in shared
// memory (8*S values), or in a global scratch when S is too large for it.
// The forward writes q[t, i, :] straight into E (and qdot into Edot); the
// backward turns them in place into E[t, i, j] = ebar_t(i)·q[t, i, j] and
// ebar_{t-1}(j) = Σ_i E[t, i, j] (column sums, deterministic order).
//
// MODE: 0 value only, 1 value and E, 2 value, E and Edot.

template <typename T> SMX_DEVICE T smx_warp_sum(T v)
{
    for (int off = 16; off > 0; off >>= 1) v += smx_shfl_xor(v, off);
    return v;
}

template <typename T> SMX_DEVICE int smx_warp_sum_int(int v)
{
    for (int off = 16; off > 0; off >>= 1) v += smx_shfl_xor(v, off);
    return v;
}

// x_j = (a ? a[j] : 0) + v[j]
template <typename T> SMX_DEVICE T smx_row_x(const T* a, const T* v, int j)
{
    return a ? a[j] + v[j] : v[j];
}

// max_Ω over the row x_j, j < S, computed by one warp. Writes q_j to q (if
// not null); with qd not null also the HVP quantities for the direction
// u_j = (zrow ? zrow[j] : 0) + vd[j]: qd_j = (H·u)_j and *vdot = <q, u>.
// Returns the value (the same in every lane); *amax gets the first argmax
// (-1 when the row is all -inf).
template <typename T, int REG>
SMX_DEVICE T smx_row_max(const T* a, const T* v, int S, T gamma, T inv_gamma, int lane,
                         T* q, const T* zrow, const T* vd, T* qd, T* vdot, int* amax)
{
    const T inf = smx_inf<T>();
    T m = -inf;
    int idx = 0x7fffffff;
    for (int j = lane; j < S; j += SMX_WARP) {
        const T x = smx_row_x(a, v, j);
        if (x > m) { m = x; idx = j; }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const T mo = smx_shfl_xor(m, off);
        const int io = smx_shfl_xor(idx, off);
        if (mo > m || (mo == m && io < idx)) { m = mo; idx = io; }
    }
    if (!(m > -inf)) {                                  // every entry is -inf
        if (amax) *amax = -1;
        for (int j = lane; j < S; j += SMX_WARP) {
            if (q) q[j] = T(0);
            if (qd) qd[j] = T(0);
        }
        if (vdot) *vdot = T(0);
        return -inf;
    }
    if (amax) *amax = idx;
    // the row's pieces (smx_ops.hpp), reduced over the warp: stat is
    // 1/Σ exp(y) (negentropy) or τ (l2), y = (x - m)/γ
    T val, stat = T(0);
    if (REG == 2) {
        val = smx::value<T, 2>(m, T(0), gamma);
    } else if (REG == 0) {
        T sacc = T(0);
        for (int j = lane; j < S; j += SMX_WARP)
            sacc += smx::exp_nonpos((smx_row_x(a, v, j) - m) * inv_gamma);
        sacc = smx_warp_sum<T>(sacc);
        stat = T(1) / sacc;
        val = smx::value<T, 0>(m, sacc, gamma);
    } else {
        // sparsemax of y by Michelot's algorithm: exact, the support shrinks
        // until it is stable; max y = 0 stays in it.
        T sz = T(0); int cnt = 0;
        for (int j = lane; j < S; j += SMX_WARP) {
            const T y = (smx_row_x(a, v, j) - m) * inv_gamma;
            if (y > -inf) { sz += y; cnt++; }
        }
        sz = smx_warp_sum<T>(sz); cnt = smx_warp_sum_int<T>(cnt);
        T tau = smx::sparsemax_tau(sz, T(cnt));
        for (;;) {
            T sz2 = T(0); int cnt2 = 0;
            for (int j = lane; j < S; j += SMX_WARP) {
                const T y = (smx_row_x(a, v, j) - m) * inv_gamma;
                if (y > tau) { sz2 += y; cnt2++; }
            }
            sz2 = smx_warp_sum<T>(sz2); cnt2 = smx_warp_sum_int<T>(cnt2);
            if (cnt2 == cnt || cnt2 == 0) break;
            cnt = cnt2; tau = smx::sparsemax_tau(sz2, T(cnt));
        }
        stat = tau;
        T vacc = T(0);
        for (int j = lane; j < S; j += SMX_WARP) {
            const T y = (smx_row_x(a, v, j) - m) * inv_gamma;
            vacc += smx::l2_term(y, smx::weight<T, 1>(y, tau));
        }
        val = smx::value<T, 1>(m, smx_warp_sum<T>(vacc), gamma);
    }
    if (!q && !qd) return val;
    // q_j, and the direction u restricted to supp(q)
    T qu = T(0), su = T(0); int ns = 0;
    for (int j = lane; j < S; j += SMX_WARP) {
        const T y = (smx_row_x(a, v, j) - m) * inv_gamma;
        const T qj = (REG == 2) ? ((j == idx) ? T(1) : T(0)) : smx::weight<T, REG>(y, stat);
        if (q) q[j] = qj;
        if (qd && qj > T(0)) {
            const T u = (zrow ? zrow[j] : T(0)) + vd[j];
            qu += qj * u; su += u; ns++;
        }
    }
    if (!qd) return val;
    qu = smx_warp_sum<T>(qu);
    if (vdot) *vdot = qu;
    T mean = T(0);
    if (REG == 1) {
        su = smx_warp_sum<T>(su); ns = smx_warp_sum_int<T>(ns);
        mean = su / T(ns > 0 ? ns : 1);
    }
    for (int j = lane; j < S; j += SMX_WARP) {
        T h = T(0);
        if (REG != 2) {
            const T y = (smx_row_x(a, v, j) - m) * inv_gamma;
            const T qj = smx::weight<T, REG>(y, stat);
            const T u = (zrow ? zrow[j] : T(0)) + vd[j];
            h = smx::hvp<T, REG>(qj, u, REG == 0 ? qu : mean, inv_gamma);
        }
        qd[j] = h;
    }
    return val;
}

template <typename T, int REG, int MODE>
SMX_GLOBAL void smx_vit(const T* __restrict__ theta, const T* __restrict__ Z,
                        const long long* __restrict__ lengths, int B, int TT, int S, T gamma,
                        T* __restrict__ value, T* E, T* Edot, T* work, int use_work)
{
    SMX_EXTERN_SHARED(unsigned char, smx_smem);
    const T inv_gamma = T(1) / gamma;
    const int b = blockIdx.x;
    const int tid = threadIdx.x, nth = blockDim.x;
    const int lane = tid % SMX_WARP, warp = tid / SMX_WARP, nw = nth / SMX_WARP;
    T* buf = use_work ? work + (smx_size)b * 8 * S : (T*)smx_smem;
    T* V[2] = {buf, buf + S};
    T* Vd[2] = {buf + 2 * S, buf + 3 * S};
    T* eb[2] = {buf + 4 * S, buf + 5 * S};
    T* ebd[2] = {buf + 6 * S, buf + 7 * S};
    const int L = (int)lengths[b];
    const smx_size SS = (smx_size)S * S;
    for (int j = tid; j < S; j += nth) { V[0][j] = T(0); Vd[0][j] = T(0); }
    smx_syncthreads();
    for (int t = 0; t < L; ++t) {
        const T* Vp = V[t & 1]; T* Vc = V[(t + 1) & 1];
        const T* Vdp = Vd[t & 1]; T* Vdc = Vd[(t + 1) & 1];
        for (int i = warp; i < S; i += nw) {
            const smx_size base = ((smx_size)b * TT + t) * SS + (smx_size)i * S;
            T vdot = T(0);
            const T val = smx_row_max<T, REG>(theta + base, Vp, S, gamma, inv_gamma, lane,
                                              MODE >= 1 ? E + base : nullptr,
                                              MODE == 2 ? Z + base : nullptr, Vdp,
                                              MODE == 2 ? Edot + base : nullptr,
                                              MODE == 2 ? &vdot : nullptr, nullptr);
            if (lane == 0) { Vc[i] = val; if (MODE == 2) Vdc[i] = vdot; }
        }
        smx_syncthreads();
    }
    if (warp == 0) {
        T vdot = T(0);
        const T val = smx_row_max<T, REG>(nullptr, V[L & 1], S, gamma, inv_gamma, lane,
                                          MODE >= 1 ? eb[0] : nullptr, nullptr, Vd[L & 1],
                                          MODE == 2 ? ebd[0] : nullptr,
                                          MODE == 2 ? &vdot : nullptr, nullptr);
        if (lane == 0) value[b] = val;
    }
    if (MODE == 0) return;
    // E = 0 past the length
    {
        T* e0 = E + ((smx_size)b * TT + L) * SS;
        T* ed0 = (MODE == 2) ? Edot + ((smx_size)b * TT + L) * SS : nullptr;
        const smx_size ntail = (smx_size)(TT - L) * SS;
        for (smx_size k = tid; k < ntail; k += nth) {
            e0[k] = T(0);
            if (MODE == 2) ed0[k] = T(0);
        }
    }
    smx_syncthreads();
    for (int t = L - 1; t >= 0; --t) {
        const T* ec = eb[(L - 1 - t) & 1]; T* ep = eb[(L - t) & 1];
        const T* edc = ebd[(L - 1 - t) & 1]; T* edp = ebd[(L - t) & 1];
        T* Et = E + ((smx_size)b * TT + t) * SS;
        T* Edt = (MODE == 2) ? Edot + ((smx_size)b * TT + t) * SS : nullptr;
        for (int i = warp; i < S; i += nw) {
            const T e_i = ec[i];
            const T ed_i = (MODE == 2) ? edc[i] : T(0);
            T* row = Et + (smx_size)i * S;
            T* rowd = (MODE == 2) ? Edt + (smx_size)i * S : nullptr;
            for (int j = lane; j < S; j += SMX_WARP) {
                const T qj = row[j];
                row[j] = e_i * qj;
                if (MODE == 2) rowd[j] = ed_i * qj + e_i * rowd[j];
            }
        }
        smx_syncthreads();
        for (int j = tid; j < S; j += nth) {
            T acc = T(0), accd = T(0);
            for (int i = 0; i < S; ++i) {
                acc += Et[(smx_size)i * S + j];
                if (MODE == 2) accd += Edt[(smx_size)i * S + j];
            }
            ep[j] = acc;
            if (MODE == 2) edp[j] = accd;
        }
        smx_syncthreads();
    }
}

// Hard decoding with back-pointers bp (B, TT, S) int32; tags -1 past the
// length, and everywhere for a sequence whose best score is -inf.
template <typename T>
SMX_GLOBAL void smx_vit_decode(const T* __restrict__ theta, const long long* __restrict__ lengths,
                               int B, int TT, int S, T* __restrict__ score,
                               long long* __restrict__ tags, int* __restrict__ bp,
                               T* work, int use_work)
{
    SMX_EXTERN_SHARED(unsigned char, smx_smem);
    const int b = blockIdx.x;
    const int tid = threadIdx.x, nth = blockDim.x;
    const int lane = tid % SMX_WARP, warp = tid / SMX_WARP, nw = nth / SMX_WARP;
    T* buf = use_work ? work + (smx_size)b * 8 * S : (T*)smx_smem;
    T* V[2] = {buf, buf + S};
    const int L = (int)lengths[b];
    const smx_size SS = (smx_size)S * S;
    for (int j = tid; j < S; j += nth) V[0][j] = T(0);
    smx_syncthreads();
    for (int t = 0; t < L; ++t) {
        const T* Vp = V[t & 1]; T* Vc = V[(t + 1) & 1];
        for (int i = warp; i < S; i += nw) {
            const smx_size base = ((smx_size)b * TT + t) * SS + (smx_size)i * S;
            int amax = -1;
            const T val = smx_row_max<T, 2>(theta + base, Vp, S, T(1), T(1), lane,
                                            nullptr, nullptr, nullptr, nullptr, nullptr, &amax);
            if (lane == 0) { Vc[i] = val; bp[((smx_size)b * TT + t) * S + i] = amax; }
        }
        smx_syncthreads();
    }
    if (warp == 0) {
        int amax = -1;
        const T val = smx_row_max<T, 2>(nullptr, V[L & 1], S, T(1), T(1), lane,
                                        nullptr, nullptr, nullptr, nullptr, nullptr, &amax);
        if (lane == 0) {
            score[b] = val;
            smx_backtrack(tags, bp, b, TT, L, S, amax);
        }
    }
}
