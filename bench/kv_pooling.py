"""Reference (numpy, float64) implementations of K/V pooling methods for one attention layer.

Optional tooling for bench/conversion_quality.py: the methods are tried here first, and the C++ implementation in
include/gqa/convert.hpp is checked against this file's math. Shapes (nn.Linear layout):
  Wq [H*D, d], bq [H*D] or None        Wk, Wv [Hkv*D, d], bk, bv [Hkv*D] or None
  Wo [d, H*D], bo [d] or None          H query heads, Hkv key/value heads, G output key/value heads
Query head j reads KV head j // (H // Hkv); group g of the output holds the KV heads `members[g]`.

Methods:
  mean, first, random   the GQA paper's pooling (K/V weights only)
  fit                   function-aware ("auto"): for every group the shared K rows are the D directions that keep
                        most of the group's score bilinear forms x~^T Wq_h~^T Wk_h x' (Wq~ = [Wq, bq], x~ = [x; 1]),
                        and the shared V rows those that keep most of the value maps Wo_h [Wv_h, bv_h]; the query
                        rows and output columns of every query head are then refitted by least squares to the
                        shared heads. With rotary embeddings (rope=True, Hugging Face half-split layout) each
                        frequency pair is a complex number and the shared key pair is the best complex combination
                        of the heads' pairs (a rotation and scale per head, which commutes with RoPE).
"""
import numpy as np


def groups_of(hkv, g, assignment=None):
    if assignment is None:
        n = hkv // g
        return [list(range(k * n, (k + 1) * n)) for k in range(g)]
    members = [[] for _ in range(g)]
    for h, a in enumerate(assignment):
        members[a].append(h)
    return members


def _heads(w, n, D):
    return [w[k * D:(k + 1) * D] for k in range(n)]


def pool_simple(W, b, hkv, D, G, method, members, seed=0):
    """mean / first / random of K or V weights (and bias), by groups `members`."""
    out_w, out_b = [], []
    rng = np.random.default_rng(seed)
    sigma = W.std()
    for m in members:
        if method == "mean":
            out_w.append(np.mean([W[k * D:(k + 1) * D] for k in m], axis=0))
            if b is not None:
                out_b.append(np.mean([b[k * D:(k + 1) * D] for k in m], axis=0))
        elif method == "first":
            out_w.append(W[m[0] * D:(m[0] + 1) * D])
            if b is not None:
                out_b.append(b[m[0] * D:(m[0] + 1) * D])
        elif method == "random":
            out_w.append(rng.normal(0, sigma, size=(D, W.shape[1])))
            if b is not None:
                out_b.append(rng.normal(0, b.std(), size=D))
        else:
            raise ValueError(method)
    return np.concatenate(out_w), (np.concatenate(out_b) if b is not None else None)


def _top_combination(R, gram, weight, n_out, eps=1e-10):
    """Rows Y^T R (Y: N x n_out) maximising sum_k weight-energy, with (Y^T gram Y) = I.

    R: N x n rows (N = stacked rows of the group's KV heads), gram = R S R^H (S the input metric), weight: N x N
    PSD (block diagonal: per KV head, the query energy reading it). Solves gram W gram y = lam gram y restricted to
    gram's range. Returns Y (N x n_out) and the eigenvalues (retained energy per shared row)."""
    lam, V = np.linalg.eigh(gram)
    keep = lam > eps * max(lam.max(), 1e-300)
    lam, V = lam[keep], V[:, keep]
    s = np.sqrt(lam)
    M = (V.conj().T @ weight @ V) * s[:, None] * s[None, :]
    mu, Z = np.linalg.eigh(M)
    order = np.argsort(mu)[::-1][:n_out]
    Z = Z[:, order]
    Y = V @ (Z / s[:, None])
    if Y.shape[1] < n_out:  # rank-deficient group: pad with zero rows
        Y = np.concatenate([Y, np.zeros((Y.shape[0], n_out - Y.shape[1]), dtype=Y.dtype)], axis=1)
    return Y, mu[order]


def fit_layer(Wq, bq, Wk, bk, Wv, bv, Wo, bo, H, hkv, D, G, members=None, rope=False, Sx=None, rope_real_pairs=0,
              sk_metric=None, sv_metric=None, out_metric=None, x_mean=None,
              temperature=False):
    """Function-aware pooling of one layer. Returns a dict of new Wq, bq, Wk, bk, Wv, bv, Wo, bo (K/V with G heads).

    Sx: (d+1) x (d+1) second moment of [x; 1] (the attention input), identity if None.
    rope_real_pairs: the last n frequency pairs (lowest frequencies) are treated as unrotated real 2-vectors."""
    d = Wq.shape[1]
    r = H // hkv
    if members is None:
        members = groups_of(hkv, G)
    S = np.eye(d + 1) if Sx is None else Sx
    aug = lambda W, b: np.concatenate([W, (b if b is not None else np.zeros(W.shape[0]))[:, None]], axis=1)
    Qa, Ka, Va = aug(Wq, bq), aug(Wk, bk), aug(Wv, bv)
    Qn, Kn, Vn = np.zeros_like(Qa), np.zeros((G * D, d + 1)), np.zeros((G * D, d + 1))
    On = np.zeros_like(Wo)
    bo_new = None if bo is None else bo.copy()
    # key side metric: without rotary embedding the key bias only shifts every score of a query by the same amount,
    # which softmax ignores, so the key side works on x alone (bias column zero-weighted).
    Sk = S.copy() if sk_metric is None else sk_metric
    if not rope:
        Sk = Sk.copy()
        Sk[d, :] = 0
        Sk[:, d] = 0
    for g, m in enumerate(members):
        qheads = [(k, k * r + t) for k in m for t in range(r)]
        # ---- V: shared rows of [Wv, bv], O columns refitted
        Rv = np.concatenate([Va[k * D:(k + 1) * D] for k in m])  # N x (d+1)
        N = Rv.shape[0]
        Wt = np.zeros((N, N))
        for i, k in enumerate(m):
            for t in range(r):
                h = k * r + t
                Oh = Wo[:, h * D:(h + 1) * D]
                Wt[i * D:(i + 1) * D, i * D:(i + 1) * D] += Oh.T @ (Oh if out_metric is None else out_metric @ Oh)
        # with an output bias the value bias is carried exactly by bo (below), so V is fitted on x alone
        Sv = S if sv_metric is None else sv_metric
        if bo is not None:
            Sv = Sv.copy()
            Sv[d, :] = 0
            Sv[:, d] = 0
        gram = Rv @ Sv @ Rv.T
        Y, _ = _top_combination(Rv, gram, Wt, D)
        Vg = Y.T @ Rv
        scale = np.sqrt(np.mean([np.sum(Va[k * D:(k + 1) * D, :d] ** 2) for k in m]) /
                        max(np.sum(Vg[:, :d] ** 2), 1e-300))
        Vg *= scale
        Kv = gram @ Y / scale  # N x D: row block i maps the shared head to KV head m[i]
        for i, k in enumerate(m):
            for t in range(r):
                h = k * r + t
                On[:, h * D:(h + 1) * D] = Wo[:, h * D:(h + 1) * D] @ Kv[i * D:(i + 1) * D]
        Vn[g * D:(g + 1) * D] = Vg
        # ---- K
        if not rope:
            Rk = np.concatenate([Ka[k * D:(k + 1) * D] for k in m])
            Wt = np.zeros((N, N))
            for i, k in enumerate(m):
                for t in range(r):
                    h = k * r + t
                    Qh = Qa[h * D:(h + 1) * D]
                    Wt[i * D:(i + 1) * D, i * D:(i + 1) * D] += Qh @ S @ Qh.T
            gram = Rk @ Sk @ Rk.T
            Y, _ = _top_combination(Rk, gram, Wt, D)
            Kg = Y.T @ Rk
            scale = np.sqrt(np.mean([np.sum(Ka[k * D:(k + 1) * D, :d] ** 2) for k in m]) /
                            max(np.sum(Kg[:, :d] ** 2), 1e-300))
            Kg *= scale
            Kq = gram @ Y / scale
            for i, k in enumerate(m):
                for t in range(r):
                    h = k * r + t
                    Qn[h * D:(h + 1) * D] = Kq[i * D:(i + 1) * D].T @ Qa[h * D:(h + 1) * D]
            Kn[g * D:(g + 1) * D] = Kg
        else:
            half = D // 2
            n_rot = half - rope_real_pairs
            # rotating pairs: complex
            for p in range(n_rot):
                c = lambda W, base: W[base + p] + 1j * W[base + p + half]
                Rk = np.stack([c(Ka, k * D) for k in m])  # N x (d+1), N = len(m)
                Wt = np.zeros((len(m), len(m)))
                for i, k in enumerate(m):
                    for t in range(r):
                        h = k * r + t
                        a = c(Qa, h * D)
                        Wt[i, i] += np.real(a.conj() @ S @ a)
                gram = Rk @ Sk @ Rk.conj().T
                Y, _ = _top_combination(Rk, gram, Wt, 1)
                # new complex row = y^T R with y = conj(u): see the derivation in convert.hpp
                u = Y[:, 0]
                row = u.conj() @ Rk
                coef = gram @ u  # (G u)_k
                nrm = np.sqrt(np.mean([np.sum(np.abs(Rk[i, :d]) ** 2) for i in range(len(m))]) /
                              max(np.sum(np.abs(row[:d]) ** 2), 1e-300))
                row *= nrm
                coef = coef / nrm
                Kn[g * D + p] = row.real
                Kn[g * D + p + half] = row.imag
                for i, k in enumerate(m):
                    for t in range(r):
                        h = k * r + t
                        a = c(Qa, h * D) * np.conj(coef[i])
                        Qn[h * D + p] = a.real
                        Qn[h * D + p + half] = a.imag
            if rope_real_pairs:
                idx = np.concatenate([np.arange(n_rot, half), np.arange(n_rot + half, D)])
                Rk = np.concatenate([Ka[k * D + idx] for k in m])
                n2 = len(idx)
                Wt = np.zeros((len(m) * n2, len(m) * n2))
                for i, k in enumerate(m):
                    for t in range(r):
                        h = k * r + t
                        Qh = Qa[h * D + idx]
                        Wt[i * n2:(i + 1) * n2, i * n2:(i + 1) * n2] += Qh @ S @ Qh.T
                gram = Rk @ Sk @ Rk.T
                Y, _ = _top_combination(Rk, gram, Wt, n2)
                Kg = Y.T @ Rk
                scale = np.sqrt(np.mean([np.sum(Ka[k * D + idx, :d] ** 2) for k in m]) /
                                max(np.sum(Kg[:, :d] ** 2), 1e-300))
                Kg *= scale
                Kq = gram @ Y / scale
                Kn[g * D + idx] = Kg
                for i, k in enumerate(m):
                    for t in range(r):
                        h = k * r + t
                        Qn[h * D + idx] = Kq[i * n2:(i + 1) * n2].T @ Qa[h * D + idx]
    if temperature:
        # the refitted query rows keep a projection of each head's score form, which is smaller: attention would
        # get flatter. Scale each query head back to its original score energy (input metric on both sides).
        Sk_ = Sk[:d, :d]
        for h in range(H):
            k = h // r
            g = next(i for i, m in enumerate(members) if k in m)
            if not rope:
                e0 = np.trace((Qa[h * D:(h + 1) * D] @ S @ Qa[h * D:(h + 1) * D].T) @ (Ka[k * D:(k + 1) * D, :d] @ Sk_ @ Ka[k * D:(k + 1) * D, :d].T))
                e1 = np.trace((Qn[h * D:(h + 1) * D] @ S @ Qn[h * D:(h + 1) * D].T) @ (Kn[g * D:(g + 1) * D, :d] @ Sk_ @ Kn[g * D:(g + 1) * D, :d].T))
            else:
                half = D // 2
                c = lambda W, base, p: W[base + p] + 1j * W[base + p + half]
                e0 = sum(np.real(c(Qa, h * D, p).conj() @ S @ c(Qa, h * D, p)) * np.real(c(Ka, k * D, p).conj() @ Sk @ c(Ka, k * D, p)) for p in range(half))
                e1 = sum(np.real(c(Qn, h * D, p).conj() @ S @ c(Qn, h * D, p)) * np.real(c(Kn, g * D, p).conj() @ Sk @ c(Kn, g * D, p)) for p in range(half))
            if e1 > 0 and e0 > 0:
                Qn[h * D:(h + 1) * D] *= np.sqrt(e0 / e1)
    out = dict(Wq=Qn[:, :d], bq=None if bq is None else Qn[:, d], Wk=Kn[:, :d], bk=None if bk is None else Kn[:, d],
               Wv=Vn[:, :d], bv=None if bv is None else Vn[:, d], Wo=On, bo=bo_new)
    if bo is not None and (bv is not None or x_mean is not None):
        # the value bias reaches the output as sum_h Wo_h bv_h whatever the attention weights: fix the rest exactly
        # (with x_mean: every input is x_mean + a varying part, so Wv x_mean is a constant too)
        mu = np.zeros(d) if x_mean is None else x_mean
        bv = np.zeros(Wv.shape[0]) if bv is None else bv
        bvn = np.zeros(G * D) if out["bv"] is None else out["bv"]
        old = sum(Wo[:, h * D:(h + 1) * D] @ (bv[(h // r) * D:(h // r + 1) * D] + Wv[(h // r) * D:(h // r + 1) * D] @ mu)
                  for h in range(H))
        rows_of = {}
        for g, m in enumerate(members):
            for k in m:
                rows_of[k] = g
        new = sum(On[:, h * D:(h + 1) * D] @ (bvn[rows_of[h // r] * D:(rows_of[h // r] + 1) * D] +
                                              out["Wv"][rows_of[h // r] * D:(rows_of[h // r] + 1) * D] @ mu)
                  for h in range(H))
        out["bo"] = bo + old - new
    return out


def permute_for(members, H, hkv):
    """Query head order that makes the groups adjacent (as gqa::query_head_order)."""
    r = H // hkv
    return [k * r + t for m in members for k in m for t in range(r)]


def group_energy(Wq, bq, Wk, Wv, bv, Wo, H, hkv, D, heads, S):
    """Fraction-weighted energy that fit keeps for one group of KV heads (K part, V part), input metric S."""
    d = Wq.shape[1]
    r = H // hkv
    aug = lambda W, b: np.concatenate([W, (b if b is not None else np.zeros(W.shape[0]))[:, None]], axis=1)
    Sk = S.copy(); Sk[d, :] = 0; Sk[:, d] = 0
    N = len(heads) * D
    Rk = np.concatenate([aug(Wk, None)[k * D:(k + 1) * D] for k in heads])
    Rv = np.concatenate([aug(Wv, bv)[k * D:(k + 1) * D] for k in heads])
    Qa = aug(Wq, bq)
    Wk_ = np.zeros((N, N)); Wv_ = np.zeros((N, N))
    for i, k in enumerate(heads):
        for t in range(r):
            h = k * r + t
            Qh = Qa[h * D:(h + 1) * D]; Oh = Wo[:, h * D:(h + 1) * D]
            Wk_[i * D:(i + 1) * D, i * D:(i + 1) * D] += Qh @ S @ Qh.T
            Wv_[i * D:(i + 1) * D, i * D:(i + 1) * D] += Oh.T @ Oh
    _, mk = _top_combination(Rk, Rk @ Sk @ Rk.T, Wk_, D)
    _, mv = _top_combination(Rv, Rv @ Sk @ Rv.T, Wv_, D)
    return mk.sum(), mv.sum()


def search_assignment(Wq, bq, Wk, Wv, bv, Wo, H, hkv, D, G, S, passes=4):
    """Groups of KV heads that keep the most energy: start adjacent, swap heads between groups while it helps."""
    n = hkv // G
    if n == 1 or G == 1:
        return groups_of(hkv, G)
    tot_k, tot_v = group_energy(Wq, bq, Wk, Wv, bv, Wo, H, hkv, D, list(range(hkv)), S) if False else (None, None)
    cache = {}

    def score(heads):
        key = tuple(sorted(heads))
        if key not in cache:
            cache[key] = group_energy(Wq, bq, Wk, Wv, bv, Wo, H, hkv, D, list(key), S)
        return cache[key]

    # normalise K and V energies by what single heads hold (the total a group could keep at most)
    single = [score([k]) for k in range(hkv)]
    tk = sum(s[0] for s in single); tv = sum(s[1] for s in single)
    val = lambda heads: score(heads)[0] / tk + score(heads)[1] / tv
    members = groups_of(hkv, G)
    for _ in range(passes):
        improved = False
        for a in range(G):
            for b in range(a + 1, G):
                for i in range(n):
                    for j in range(n):
                        A, B = members[a][:], members[b][:]
                        A[i], B[j] = B[j], A[i]
                        if val(A) + val(B) > val(members[a]) + val(members[b]) + 1e-12:
                            members[a], members[b] = sorted(A), sorted(B)
                            improved = True
        if not improved:
            break
    return members
