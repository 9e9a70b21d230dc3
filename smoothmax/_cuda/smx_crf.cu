// Factorised Vit_Ω (linear-chain CRF) on the GPU: one block per sequence, one
// warp per state row, the same row operator smx_row_max as smx_vit.
//
// emissions (B, TT, S), At = transitions.T (S, S) so that row i of At holds
// the scores of the moves j -> i, start, end (S):
//   V_0(i) = start[i] + em[0, i]
//   V_t(i) = em[t, i] + max_Ω_j (At[i, j] + V_{t-1}(j))
//   value  = max_Ω_i (V_{L-1}(i) + end[i])
// The forward keeps V_t (and Vdot_t for the HVP) of every step in the block's
// global scratch (2 TT S values); the reverse recomputes each step's weights
// q_t(i, :) row by row into an S x S scratch (never a (TT, S, S) array),
// scales them by ebar_t(i) and takes column sums for ebar_{t-1}. The shared
// gradients (transitions in the At layout, start, end), weighted by
// weights[b], go to the block's row of `part` (B, S*S + 2S); the launcher sums
// the rows (deterministic, no atomics).
//
// MODE: 0 value only, 1 value and gradients, 2 HVP (ge, part hold the HVP;
// vdot[b] = <grad value_b, Z_b>).

template <typename T, int REG, int MODE>
SMX_GLOBAL void smx_crf(const T* __restrict__ em, const T* __restrict__ Ze,
                        const T* __restrict__ At, const T* __restrict__ ZAt,
                        const T* __restrict__ st, const T* __restrict__ en,
                        const T* __restrict__ Zs, const T* __restrict__ Zen,
                        const long long* __restrict__ lengths, const T* __restrict__ weights,
                        int B, int TT, int S, T gamma,
                        T* __restrict__ value, T* __restrict__ vdot, T* __restrict__ ge,
                        T* __restrict__ part, T* work)
{
    const T inv_gamma = T(1) / gamma;
    const int b = blockIdx.x;
    const int tid = threadIdx.x, nth = blockDim.x;
    const int lane = tid % SMX_WARP, warp = tid / SMX_WARP, nw = nth / SMX_WARP;
    const smx_size TS = (smx_size)TT * S, SS = (smx_size)S * S;
    T* buf = work + (smx_size)b * (2 * TS + 2 * SS + 5 * (smx_size)S);
    T* Vh = buf;
    T* Vdh = buf + TS;
    T* Es = buf + 2 * TS;
    T* Eds = Es + SS;
    T* eb[2] = {Eds + SS, Eds + SS + S};
    T* ebd[2] = {Eds + SS + 2 * S, Eds + SS + 3 * S};
    T* xrow = Eds + SS + 4 * S;
    const int L = (int)lengths[b];
    const T* emb = em + (smx_size)b * TS;
    const T* Zeb = (MODE == 2) ? Ze + (smx_size)b * TS : nullptr;
    for (int i = tid; i < S; i += nth) {
        Vh[i] = st[i] + emb[i];
        if (MODE == 2) Vdh[i] = Zs[i] + Zeb[i];
    }
    smx_syncthreads();
    for (int t = 1; t < L; ++t) {
        const T* Vp = Vh + (smx_size)(t - 1) * S; T* Vc = Vh + (smx_size)t * S;
        const T* Vdp = Vdh + (smx_size)(t - 1) * S; T* Vdc = Vdh + (smx_size)t * S;
        for (int i = warp; i < S; i += nw) {
            T vd = T(0);
            const T val = smx_row_max<T, REG>(At + (smx_size)i * S, Vp, S, gamma, inv_gamma, lane,
                                              nullptr, MODE == 2 ? ZAt + (smx_size)i * S : nullptr,
                                              Vdp, MODE == 2 ? Eds + (smx_size)i * S : nullptr,
                                              MODE == 2 ? &vd : nullptr, nullptr);
            if (lane == 0) {
                Vc[i] = val + emb[(smx_size)t * S + i];
                if (MODE == 2) Vdc[i] = vd + Zeb[(smx_size)t * S + i];
            }
        }
        smx_syncthreads();
    }
    for (int i = tid; i < S; i += nth) xrow[i] = Vh[(smx_size)(L - 1) * S + i] + en[i];
    smx_syncthreads();
    if (warp == 0) {
        T vd = T(0);
        const T val = smx_row_max<T, REG>(nullptr, xrow, S, gamma, inv_gamma, lane,
                                          MODE >= 1 ? eb[0] : nullptr,
                                          MODE == 2 ? Zen : nullptr, Vdh + (smx_size)(L - 1) * S,
                                          MODE == 2 ? ebd[0] : nullptr,
                                          MODE == 2 ? &vd : nullptr, nullptr);
        if (lane == 0) {
            value[b] = val;
            if (MODE == 2) vdot[b] = vd;
        }
    }
    if (MODE == 0) return;
    smx_syncthreads();
    const T w = weights[b];
    T* pb = part + (smx_size)b * (SS + 2 * S);
    T* geb = ge + (smx_size)b * TS;
    for (smx_size k = (smx_size)L * S + tid; k < TS; k += nth) geb[k] = T(0);
    int c = 0;
    for (int i = tid; i < S; i += nth) {
        const T g = (MODE == 2) ? ebd[0][i] : eb[0][i];
        pb[SS + S + i] += w * g;
        geb[(smx_size)(L - 1) * S + i] = g;
    }
    smx_syncthreads();
    for (int t = L - 1; t >= 1; --t) {
        const T* ec = eb[c]; T* ep = eb[1 - c];
        const T* edc = ebd[c]; T* edp = ebd[1 - c];
        const T* Vp = Vh + (smx_size)(t - 1) * S;
        const T* Vdp = Vdh + (smx_size)(t - 1) * S;
        for (int i = warp; i < S; i += nw) {
            T* row = Es + (smx_size)i * S;
            T* rowd = Eds + (smx_size)i * S;
            smx_row_max<T, REG>(At + (smx_size)i * S, Vp, S, gamma, inv_gamma, lane, row,
                                MODE == 2 ? ZAt + (smx_size)i * S : nullptr, Vdp,
                                MODE == 2 ? rowd : nullptr, nullptr, nullptr);
            const T e_i = ec[i];
            const T ed_i = (MODE == 2) ? edc[i] : T(0);
            for (int j = lane; j < S; j += SMX_WARP) {
                const T qj = row[j];
                const T e = e_i * qj;
                row[j] = e;
                if (MODE == 2) {
                    const T ed = ed_i * qj + e_i * rowd[j];
                    rowd[j] = ed;
                    pb[(smx_size)i * S + j] += w * ed;
                } else {
                    pb[(smx_size)i * S + j] += w * e;
                }
            }
        }
        smx_syncthreads();
        for (int j = tid; j < S; j += nth) {
            T acc = T(0), accd = T(0);
            for (int i = 0; i < S; ++i) {
                acc += Es[(smx_size)i * S + j];
                if (MODE == 2) accd += Eds[(smx_size)i * S + j];
            }
            ep[j] = acc;
            if (MODE == 2) edp[j] = accd;
            geb[(smx_size)(t - 1) * S + j] = (MODE == 2) ? accd : acc;
        }
        smx_syncthreads();
        c = 1 - c;
    }
    for (int i = tid; i < S; i += nth) pb[SS + i] += w * ((MODE == 2) ? ebd[c][i] : eb[c][i]);
}

// Hard decoding of the factorised problem; back-pointers bp (B, TT, S) int32;
// tags -1 past the length, and everywhere when the best score is -inf.
template <typename T>
SMX_GLOBAL void smx_crf_decode(const T* __restrict__ em, const T* __restrict__ At,
                               const T* __restrict__ st, const T* __restrict__ en,
                               const long long* __restrict__ lengths, int B, int TT, int S,
                               T* __restrict__ score, long long* __restrict__ tags,
                               int* __restrict__ bp, T* work)
{
    const int b = blockIdx.x;
    const int tid = threadIdx.x, nth = blockDim.x;
    const int lane = tid % SMX_WARP, warp = tid / SMX_WARP, nw = nth / SMX_WARP;
    T* buf = work + (smx_size)b * 3 * S;
    T* V[2] = {buf, buf + S};
    T* xrow = buf + 2 * S;
    const int L = (int)lengths[b];
    const T* emb = em + (smx_size)b * TT * S;
    for (int j = tid; j < S; j += nth) V[0][j] = st[j] + emb[j];
    smx_syncthreads();
    for (int t = 1; t < L; ++t) {
        const T* Vp = V[(t - 1) & 1]; T* Vc = V[t & 1];
        for (int i = warp; i < S; i += nw) {
            int amax = -1;
            const T val = smx_row_max<T, 2>(At + (smx_size)i * S, Vp, S, T(1), T(1), lane,
                                            nullptr, nullptr, nullptr, nullptr, nullptr, &amax);
            if (lane == 0) {
                Vc[i] = val + emb[(smx_size)t * S + i];
                bp[((smx_size)b * TT + t) * S + i] = amax;
            }
        }
        smx_syncthreads();
    }
    for (int j = tid; j < S; j += nth) xrow[j] = V[(L - 1) & 1][j] + en[j];
    smx_syncthreads();
    if (warp == 0) {
        int amax = -1;
        const T val = smx_row_max<T, 2>(nullptr, xrow, S, T(1), T(1), lane,
                                        nullptr, nullptr, nullptr, nullptr, nullptr, &amax);
        if (lane == 0) {
            score[b] = val;
            smx_backtrack(tags, bp, b, TT, L, S, amax);
        }
    }
}
