"""BEBR: learned recurrent binarization of embeddings, ``bebr{u}[d{D}]`` (u+1 bits per output dim).

Gan et al., "Binary Embedding-based Retrieval at Tencent", KDD 2023, https://arxiv.org/abs/2302.08714
(Sec. 3.1 recurrent binarization, Sec. 3.2 embedding-to-embedding training, Sec. 3.4 SDC).

Encoding (Sec. 3.1), with x the L2-normalised input, W / R_i / B_i small residual MLPs:

    b_0 = sign(W(x));  z_0 = b_0
    for i = 1..u:  b_i = sign(R_i(x - normalize(B_{i-1}(z_{i-1}))));  z_i = z_{i-1} + 2^-i b_i

The code stores the u+1 bit-planes b_0..b_u (D bits each, packed): ``code_bytes = (u+1)*ceil(D/8)``.
The network starts from ITQ: W is the centred PCA projection turned by ITQ's learned rotation (so
b_0 starts as the ITQ code), each R_i binarizes the residual in the same basis and each B_i maps
back. Training is embedding-to-embedding on the corpus vectors alone: an InfoNCE loss
(temperature 0.05) on the cosine similarities of the recurrent codes z (with a learned scale),
whose targets are the softmax of the float similarities — the float nearest neighbours are the
positives, the rest of the batch the negatives, and each anchor's float k-NN supply hard
negatives. ``sign`` uses a clipped straight-through estimator. A small reconstruction loss trains
the B_i (and a final B_u used by ``decode``). The epoch kept (the start included) is the one whose
codes best recall the float 10-NN of held-out corpus vectors: on SciFact a learning rate of 3e-4
already loses recall against the start, so training is fine-tuning at a small rate, checked.

Scoring is the symmetric distance calculation (SDC): queries are encoded the same way and
``<z_q, z_x> = sum_{i,j} 2^-(i+j) <b_i^q, b_j^x>`` with ``<b_i, b_j> = D - 2 popcount(b_i xor b_j)``,
so a scan is (u+1)^2 XOR+popcount passes over packed codes, never a float matmul. BEBR binarizes
directions, so every metric ranks by the cosine of the codes: IP and COSINE distance ``= -cos``, L2
distance ``= 2 - 2 cos`` (squared distance between the normalised codes).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import faiss
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from embpress.vectors.binary import itq_rotation, random_orthogonal
from embpress.vectors.codec import Codec, StateValue, register_codec
from embpress.vectors.kernels import as_words, planes_search
from embpress.vectors.metric import Metric
from embpress.vectors.scan import hamming

log = logging.getLogger(__name__)

_MAX_LOOPS = 7
_ENCODE_BATCH = 8192
_VAL_K = 10


def _ste_sign(h: torch.Tensor) -> torch.Tensor:
    """±1 forward, clipped identity backward (straight-through estimator)."""
    soft = h.clamp(-1.0, 1.0)
    hard = torch.where(h > 0, 1.0, -1.0)
    return soft + (hard - soft).detach()


class _ResidualMLP(nn.Module):
    """``y = A x + fc2(gelu(fc1(x)))``: a linear map plus a two-layer MLP correction."""

    def __init__(self, d_in: int, d_out: int, hidden: int):
        super().__init__()
        self.skip = nn.Linear(d_in, d_out)
        self.fc1 = nn.Linear(d_in, hidden)
        self.fc2 = nn.Linear(hidden, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.skip(x) + self.fc2(F.gelu(self.fc1(x)))

    def reset(self, gen: torch.Generator, weight: np.ndarray, bias: np.ndarray) -> None:
        """Start as the linear map ``weight @ x + bias`` (an MLP correction initialised to zero)."""
        with torch.no_grad():
            self.skip.weight.copy_(torch.from_numpy(np.asarray(weight, dtype=np.float32)))
            self.skip.bias.copy_(torch.from_numpy(np.asarray(bias, dtype=np.float32)))
        nn.init.normal_(self.fc1.weight, std=self.fc1.in_features**-0.5, generator=gen)
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.weight)  # starts as a linear map
        nn.init.zeros_(self.fc2.bias)


class _RecurrentBinarizer(nn.Module):
    """W (binarize), R_i (residual binarize) and B_i (reconstruct) blocks of BEBR."""

    def __init__(self, d: int, dim: int, loops: int, hidden: int):
        super().__init__()
        self.binarize = _ResidualMLP(d, dim, hidden)
        self.residual = nn.ModuleList([_ResidualMLP(d, dim, hidden) for _ in range(loops)])
        self.reconstruct = nn.ModuleList([_ResidualMLP(dim, d, hidden) for _ in range(loops + 1)])

    def forward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """x: (B, d) normalised. Returns the ±1 planes b_0..b_u and the partial codes z_0..z_u."""
        b = _ste_sign(self.binarize(x))
        planes, codes = [b], [b]
        for i, (res, rec) in enumerate(zip(self.residual, self.reconstruct, strict=False)):
            r = x - F.normalize(rec(codes[-1]), dim=1)
            b = _ste_sign(res(r))
            planes.append(b)
            codes.append(codes[-1] + 2.0 ** -(i + 1) * b)
        return planes, codes


@register_codec(r"bebr(?P<u>\d+)(?:d(?P<dim>\d+))?", form="bebr{u}[d{D}]", examples=("bebr1", "bebr2d8"))
class BEBRCodec(Codec):
    """Recurrent binarization with u residual loops: u+1 bits per output dim, trained contrastively.

    Args:
        loops: u, the number of residual binarization loops (0..7); bits per output dim = u + 1.
        dim: output dim D (default: the input dim); total bits = D * (u + 1).
        hidden: hidden width of the MLP blocks (default D).
        epochs: passes over the (sub-sampled) corpus.
        batch_size: anchors per step.
        n_neighbors: float k-NN of each anchor added as hard negatives / soft positives.
        temperature: InfoNCE temperature for both the code and the float similarities.
        lr: Adam learning rate (cosine-decayed to 0).
        recon_weight: weight of the reconstruction loss ``1 - cos(x, B_i(z_i))``.
        max_train: at most this many corpus vectors are used for training.
        loss: ``"distill"`` (default): soft-target InfoNCE of the code cosines against the float
            cosines over the batch and each anchor's float k-NN; ``"infonce"``: the paper's
            hard-label form, the decoded code of an anchor must pick its own float vector among
            the same candidates (it lost recall on SciFact; see the README).
        val_size: held-out corpus vectors (at most a tenth of the training set; none under 100)
            whose code 10-NN recall against their float 10-NN picks the epoch kept, the start
            included.
        itq_iters: ITQ iterations that learn the starting rotation of W and the R_i on the PCA
            projection (0: a random rotation, ITQ's own starting point).
        num_threads: torch threads while training/encoding (None: leave torch's setting).
        seed: seed of the initialisation, sub-sampling and batch order.

    Fitted: ``dim_``, ``hidden_``, ``loss_history_`` (epochs,) mean training loss per epoch,
    ``val_recall_history_`` (epochs + 1,) held-out recall@10 at the start and after each epoch (nan
    without a held-out set), ``best_epoch_`` (0: the start) and the network weights (``get_state``
    keys ``weights.*``).

    Examples:
        >>> import numpy as np
        >>> x = np.random.default_rng(0).standard_normal((256, 16)).astype(np.float32)
        >>> c = BEBRCodec(loops=1, dim=8, epochs=1).fit(x)
        >>> c.encode(x).shape, c.distances(x[:3], c.encode(x), "cosine").shape
        ((256, 2), (3, 256))
    """

    def __init__(
        self,
        *,
        loops: int = 1,
        dim: int | None = None,
        hidden: int | None = None,
        epochs: int = 10,
        batch_size: int = 256,
        n_neighbors: int = 8,
        temperature: float = 0.05,
        lr: float = 1e-4,
        recon_weight: float = 0.1,
        max_train: int = 50_000,
        itq_iters: int = 50,
        loss: str = "distill",
        val_size: int = 1000,
        num_threads: int | None = None,
        seed: int = 0,
    ):
        self.loops = loops
        self.dim = dim
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.n_neighbors = n_neighbors
        self.temperature = temperature
        self.lr = lr
        self.recon_weight = recon_weight
        self.max_train = max_train
        self.itq_iters = itq_iters
        self.loss = loss
        self.val_size = val_size
        self.num_threads = num_threads
        self.seed = seed

    @classmethod
    def _from_spec(cls, groups: dict[str, Any], seed: int) -> Codec:
        dim = groups.get("dim")
        return cls(loops=int(groups["u"]), dim=None if dim is None else int(dim), seed=seed)

    def _canonical_spec(self) -> str:
        return f"bebr{self.loops}" + ("" if self.dim is None else f"d{self.dim}")

    def _check_params(self) -> None:
        if not isinstance(self.loops, int) or not 0 <= self.loops <= _MAX_LOOPS:
            raise ValueError(f"bebr: loops u must be an int in [0, {_MAX_LOOPS}], got {self.loops!r}")
        for name in ("dim", "hidden"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"bebr: {name} must be a positive int or None, got {v!r}")
        if self.loss not in ("distill", "infonce"):
            raise ValueError(f"bebr: loss must be 'distill' or 'infonce', got {self.loss!r}")
        if not isinstance(self.val_size, int) or self.val_size < 0:
            raise ValueError(f"bebr: val_size must be a non-negative int, got {self.val_size!r}")
        if not isinstance(self.itq_iters, int) or self.itq_iters < 0:
            raise ValueError(f"bebr: itq_iters must be a non-negative int, got {self.itq_iters!r}")
        for name in ("epochs", "batch_size", "max_train"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"bebr: {name} must be a positive int, got {v!r}")
        if not isinstance(self.n_neighbors, int) or self.n_neighbors < 0:
            raise ValueError(f"bebr: n_neighbors must be a non-negative int, got {self.n_neighbors!r}")
        if not self.temperature > 0 or not self.lr > 0 or not self.recon_weight >= 0:
            raise ValueError("bebr: temperature and lr must be > 0 and recon_weight >= 0")

    def _out_dim(self, d: int) -> int:
        return d if self.dim is None else self.dim

    def _code_bytes_for(self, d: int) -> int:
        return (self.loops + 1) * ((self._out_dim(d) + 7) // 8)

    # -------------------------------------------------------------- training
    def _threads(self) -> _TorchThreads:
        return _TorchThreads(self.num_threads)

    def _fit(self, x: np.ndarray) -> None:
        if x.shape[0] < 2:
            raise ValueError(
                f"bebr: contrastive training needs at least 2 training vectors, got {x.shape[0]}"
            )
        rng = np.random.default_rng(self.seed)
        gen = torch.Generator().manual_seed(int(self.seed))
        d = x.shape[1]
        self.dim_ = self._out_dim(d)
        self.hidden_ = self.hidden or self.dim_
        xs = (
            x
            if x.shape[0] <= self.max_train
            else x[np.sort(rng.choice(x.shape[0], self.max_train, replace=False))]
        )
        xn = xs / np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-12)
        # Held-out corpus vectors pick the epoch: training can lower the loss while it loses
        # recall, so the state kept is the one (the start included) whose codes find the float
        # 10-NN of the held-out vectors best.
        n_val = min(self.val_size, xn.shape[0] // 10) if xn.shape[0] >= 100 else 0
        order = rng.permutation(xn.shape[0])
        xv, xn = xn[order[:n_val]], xn[np.sort(order[n_val:])]
        n = xn.shape[0]
        k = min(self.n_neighbors, n - 1)
        nbrs = np.zeros((n, 0), dtype=np.int64)
        if k > 0:
            _, nbrs = faiss.knn(xn, xn, k + 1, faiss.METRIC_INNER_PRODUCT)
            nbrs = nbrs[:, 1:]
        net = _RecurrentBinarizer(d, self.dim_, self.loops, self.hidden_)
        self._init_linear(net, xn, rng, gen)
        xt = torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32))
        nt = torch.from_numpy(nbrs.astype(np.int64))
        val = None
        if n_val:
            kv = min(_VAL_K, n)
            _, truth = faiss.knn(xv, xn, kv, faiss.METRIC_INNER_PRODUCT)
            val = (torch.from_numpy(np.ascontiguousarray(xv, dtype=np.float32)), truth, kv)
        bs = min(self.batch_size, n)
        steps = self.epochs * (-(-n // bs))
        # The code similarities get their own learned scale (init 1/temperature): cosines of codes
        # spread differently from float cosines, and a fixed scale would make the loss match
        # absolute similarity gaps the codes cannot express rather than the ranking.
        self._log_scale = nn.Parameter(torch.tensor(float(np.log(1 / self.temperature))))
        opt = torch.optim.Adam([*net.parameters(), self._log_scale], lr=self.lr)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + np.cos(np.pi * s / steps)))
        history, val_history = [], []
        with self._threads():
            best = (self._val_recall(net, xt, val), -1, copy.deepcopy(net.state_dict()))
            val_history.append(best[0])
            log.info("bebr%d start: held-out recall@%d %.4f", self.loops, _VAL_K, best[0])
            for epoch in range(self.epochs):
                net.train()
                perm = torch.randperm(n, generator=gen)
                total = 0.0
                for s in range(0, n, bs):
                    idx = perm[s : s + bs]
                    loss = self._loss(net, xt, idx, nt[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                    sched.step()
                    total += float(loss.detach()) * len(idx)
                history.append(total / n)
                rec = self._val_recall(net, xt, val)
                val_history.append(rec)
                if val is None or rec > best[0]:
                    best = (rec, epoch, copy.deepcopy(net.state_dict()))
                log.info("bebr%d epoch %d/%d loss %.4f held-out recall@%d %.4f", self.loops, epoch + 1,
                         self.epochs, total / n, _VAL_K, rec)
        net.load_state_dict(best[2])
        net.eval()
        self.loss_history_ = np.asarray(history, dtype=np.float32)
        self.val_recall_history_ = np.asarray(val_history, dtype=np.float32)
        self.best_epoch_ = best[1] + 1
        self._net = net

    @torch.no_grad()
    def _val_recall(
        self, net: _RecurrentBinarizer, xt: torch.Tensor, val: tuple[torch.Tensor, np.ndarray, int] | None
    ) -> float:
        """recall@10 of the held-out vectors' code neighbours (cosine of the recurrent codes, the
        ranking the SDC scan gives) against their float neighbours; nan without a held-out set."""
        if val is None:
            return float("nan")
        xv, truth, kv = val
        net.eval()
        zt = torch.cat([F.normalize(net(xt[s : s + _ENCODE_BATCH])[1][-1], dim=1)
                        for s in range(0, len(xt), _ENCODE_BATCH)])
        zv = F.normalize(net(xv)[1][-1], dim=1)
        top = torch.cat([torch.topk(zv[s : s + 256] @ zt.T, kv, dim=1).indices  # bounded (256, n) blocks
                         for s in range(0, len(zv), 256)]).numpy()
        return float(np.mean([len(set(a) & set(b)) for a, b in zip(top, truth, strict=True)]) / kv)

    def _init_linear(
        self, net: _RecurrentBinarizer, xn: np.ndarray, rng: np.random.Generator, gen: torch.Generator
    ) -> None:
        """Data-aware start: W = centred PCA (random expansion when D > d) and ITQ's learned rotation
        (a random one when ``itq_iters`` is 0), so b_0 starts as the ITQ code; R_i = the same
        projection of the residual, B_i = its transpose back to the input space."""
        d, dim = xn.shape[1], self.dim_
        mean = xn.mean(axis=0)
        xc = (xn - mean).astype(np.float64)
        if dim <= d:
            evals, evecs = np.linalg.eigh(xc.T @ xc)
            basis = evecs[:, np.argsort(evals)[::-1][:dim]]
        else:
            basis = random_orthogonal(d, dim, rng).astype(np.float64)
        v = (xc @ basis).astype(np.float32)
        rot = itq_rotation(v, self.itq_iters, rng) if self.itq_iters else random_orthogonal(dim, dim, rng)
        proj = basis @ rot.astype(np.float64)  # (d, D)
        # Scale every projection so its pre-activations are O(1): the STE's clip window then
        # matches the data and Adam's steps are small relative to the weights.
        h = xc @ proj
        scale = float(np.abs(h).mean()) or 1.0
        net.binarize.reset(gen, proj.T / scale, -(mean @ proj) / scale)
        rec_w, rec_b = scale * proj, mean
        for block in net.reconstruct:
            block.reset(gen, rec_w, rec_b)
        z = np.where(h > 0, 1.0, -1.0)
        for i, block in enumerate(net.residual):
            rec = z @ rec_w.T + rec_b
            r = xn - rec / np.maximum(np.linalg.norm(rec, axis=1, keepdims=True), 1e-12)
            hr = r @ proj
            s_r = float(np.abs(hr).mean()) or 1.0
            block.reset(gen, proj.T / s_r, np.zeros(dim))
            z = z + 2.0 ** -(i + 1) * np.where(hr > 0, 1.0, -1.0)

    def _loss(
        self, net: _RecurrentBinarizer, xt: torch.Tensor, idx: torch.Tensor, nb: torch.Tensor
    ) -> torch.Tensor:
        """InfoNCE over in-batch and k-NN candidates, plus reconstruction (see :class:`BEBRCodec`)."""
        cand = torch.cat([idx, nb.reshape(-1)])
        xc = xt[cand]
        if self.loss == "infonce":
            return self._infonce(net, xc, idx, cand)
        _, codes = net(xc)
        z = F.normalize(codes[-1], dim=1)
        a = len(idx)
        tau = self.temperature
        logits = z[:a] @ z.T * self._log_scale.exp()
        targets = xc[:a] @ xc.T / tau
        self_mask = cand[None, :] == idx[:, None]
        logits = logits.masked_fill(self_mask, float("-inf"))
        targets = targets.masked_fill(self_mask, float("-inf"))
        loss = (
            -(torch.softmax(targets, dim=1) * torch.log_softmax(logits, dim=1).masked_fill(self_mask, 0))
            .sum(1)
            .mean()
        )
        if self.recon_weight > 0:
            rec = sum(
                (1 - F.cosine_similarity(block(c[:a]), xc[:a], dim=1)).mean()
                for block, c in zip(net.reconstruct, codes, strict=True)
            )
            loss = loss + self.recon_weight * rec / len(codes)
        return loss

    def _infonce(
        self, net: _RecurrentBinarizer, xc: torch.Tensor, idx: torch.Tensor, cand: torch.Tensor
    ) -> torch.Tensor:
        """The paper's embedding-to-embedding loss: the decoded code of each anchor must pick its own
        float vector among the float candidates (the batch and every anchor's k-NN hard negatives)."""
        a = len(idx)
        _, codes = net(xc[:a])
        logits = F.normalize(net.reconstruct[-1](codes[-1]), dim=1) @ xc.T / self.temperature
        own = torch.arange(a)
        dup = (cand[None, :] == idx[:, None]) & (torch.arange(len(cand))[None, :] != own[:, None])
        return F.cross_entropy(logits.masked_fill(dup, float("-inf")), own)

    # -------------------------------------------------------------- encoding and scoring
    def _network(self) -> _RecurrentBinarizer:
        net = self.__dict__.get("_net")
        if net is None:
            raise ValueError("BEBR weights missing; rebuild the codec with from_state(get_state())")
        return net

    def _planes(self, x: np.ndarray) -> list[np.ndarray]:
        """±1 bit-planes as booleans: list of u+1 arrays (N, D)."""
        xn = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        net = self._network()
        with self._threads(), torch.no_grad():
            planes, _ = net(torch.from_numpy(np.ascontiguousarray(xn, dtype=np.float32)))
        return [p.numpy() > 0 for p in planes]

    def _encode(self, x: np.ndarray) -> np.ndarray:
        out = []
        for s in range(0, x.shape[0], _ENCODE_BATCH):
            out.append(
                np.concatenate(
                    [np.packbits(p, axis=1) for p in self._planes(x[s : s + _ENCODE_BATCH])], axis=1
                )
            )
        return np.concatenate(out, axis=0)

    def _split(self, codes: np.ndarray) -> list[np.ndarray]:
        nb = (self.dim_ + 7) // 8
        return [np.ascontiguousarray(codes[:, i * nb : (i + 1) * nb]) for i in range(self.loops + 1)]

    def _weights(self) -> np.ndarray:
        return 2.0 ** -np.arange(self.loops + 1)

    def recurrent_codes(self, codes: np.ndarray) -> np.ndarray:
        """The recurrent vectors ``z = sum_i 2^-i b_i`` of codes, (N, D) float32 (for inspection)."""
        codes = self._check_codes(codes)
        w = self._weights()
        z = np.zeros((codes.shape[0], self.dim_), dtype=np.float32)
        for wi, p in zip(w, self._split(codes), strict=True):
            z += np.float32(wi) * (np.unpackbits(p, axis=1, count=self.dim_).astype(np.float32) * 2 - 1)
        return z

    def _decode(self, codes: np.ndarray) -> np.ndarray:
        z = torch.from_numpy(self.recurrent_codes(codes))
        with self._threads(), torch.no_grad():
            return F.normalize(self._network().reconstruct[-1](z), dim=1).numpy()

    def _self_norms(self, planes: list[np.ndarray]) -> np.ndarray:
        """|z|^2 per code from popcounts between its own planes, (N,) float64."""
        w = self._weights()
        sq = np.zeros(planes[0].shape[0], dtype=np.float64)
        for i, pi in enumerate(planes):
            for j, pj in enumerate(planes):
                h = np.bitwise_count(np.bitwise_xor(pi, pj)).sum(axis=1, dtype=np.int64)
                sq += w[i] * w[j] * (self.dim_ - 2 * h)
        return sq

    def _distances(self, q: np.ndarray, codes: np.ndarray, metric: Metric) -> np.ndarray:
        w = self._weights()
        qp, cp = self._split(self._encode(q)), self._split(codes)
        sim = np.zeros((q.shape[0], codes.shape[0]), dtype=np.float64)
        for i, qi in enumerate(qp):
            for j, cj in enumerate(cp):
                sim += w[i] * w[j] * (self.dim_ - 2 * hamming(qi, cj).astype(np.float64))
        cos = sim / np.sqrt(self._self_norms(qp))[:, None] / np.sqrt(self._self_norms(cp))[None, :]
        if metric is Metric.L2:
            return (2 - 2 * cos).astype(np.float32)
        return (-cos).astype(np.float32)

    def _search_lists(self, q, codes, k, metric, offsets, ids, probes, bias, mask):
        if bias.size:
            raise ValueError(f"{self.spec}: BEBR codes cannot take a per-list bias (no residual encoding)")
        planes = self.loops + 1
        s, found = planes_search(as_words(self._encode(q), planes), as_words(codes, planes),
                                 self._weights().astype(np.float64), float(self.dim_), offsets, ids, probes, mask, k)
        dist = 2 + 2 * s if metric is Metric.L2 else s  # s = -cos
        return np.where(found >= 0, dist, np.float32(np.inf)).astype(np.float32), found

    # -------------------------------------------------------------- state
    def _fitted_state(self) -> dict[str, StateValue]:
        state = super()._fitted_state()
        for name, t in self._network().state_dict().items():
            state[f"weights.{name}"] = t.detach().numpy().copy()
        return state

    def _load_fitted_state(self, state: dict[str, Any]) -> None:
        weights = {k[len("weights.") :]: v for k, v in state.items() if k.startswith("weights.")}
        super()._load_fitted_state({k: v for k, v in state.items() if not k.startswith("weights.")})
        net = _RecurrentBinarizer(int(self.d_), int(self.dim_), self.loops, int(self.hidden_))
        net.load_state_dict(
            {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in weights.items()}
        )
        net.eval()
        self._net = net


class _TorchThreads:
    """Context manager that sets torch's intra-op threads and restores them."""

    def __init__(self, n: int | None):
        self.n = n
        self.prev = torch.get_num_threads()

    def __enter__(self) -> None:
        if self.n is not None:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if self.n is not None:
            torch.set_num_threads(self.prev)
