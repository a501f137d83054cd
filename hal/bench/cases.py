"""The benchmark cases: model shapes, the size presets, what each case reads and computes.

Three kinds, each against the baselines a user would otherwise run, in the same process:

- ``decode``: one query token per sequence over a paged cache of Llama-3-8B's attention (32 query /
  8 KV heads, head dim 128, blocks of 16, pages randomly permuted), for every kv_dtype the backend
  declares. ``hal.plan`` once per step, reused by every layer (as a runtime does);
  ``hal.paged_attention`` timed over all layers. Baselines: ``sdpa`` (torch SDPA with
  ``enable_gqa`` on contiguous per-sequence KV ``[B, Hkv, S, D]`` in the model dtype, its own copy
  per layer, as Hugging Face and torch users call it), ``sdpa-packed`` (the same SDPA with each KV
  head's query heads as its query rows, FlashInfer's GQA packing: on a CPU often several times
  faster, so the strongest SDPA baseline) and ``gather+sdpa`` (``cache.read`` of the sequences'
  pages, dequantized, then SDPA with ``enable_gqa``, as SGLang's torch-native backend does).
- ``prefill``: causal ``hal.attention`` on one sequence of N tokens (Llama-3-8B heads); baseline
  ``sdpa`` with ``is_causal`` on the same values laid out ``[1, H, N, D]``.
- ``mla``: absorbed MLA decode, ``hal.mla_attention``, on DeepSeek-V2-Lite shapes (16 heads,
  kv_lora_rank 512, rope 64, blocks of 64). Baselines as for decode, with MLA written as multi-query
  attention over the 576-wide latent row, which serves as keys and as values (output sliced to 512).

Decode and MLA cycle through enough layers (one cache of many layers) that one measurement reads
more KV than the working-set target (1 GiB and 4 x the last-level cache for the full run), or the
"bandwidth" would be the cache's. Every layer holds the same values, in distinct memory.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hal.bench import accounting as A
from hal.dtypes import DTYPES

__all__ = ["AttnShape", "MlaShape", "LLAMA3_8B", "DSV2_LITE", "BASELINES", "Sizes", "FULL", "QUICK", "TINY",
           "CaseSpec", "case_list"]


@dataclass(frozen=True)
class AttnShape:
    name: str
    hq: int
    hkv: int
    d: int
    dv: int
    block_size: int


@dataclass(frozen=True)
class MlaShape:
    name: str
    heads: int
    kv_lora_rank: int
    rope_dim: int
    qk_nope_dim: int  # softmax scale is 1/sqrt(qk_nope_dim + rope_dim), the pre-absorption head dim
    block_size: int


LLAMA3_8B = AttnShape("Llama-3-8B", hq=32, hkv=8, d=128, dv=128, block_size=16)
DSV2_LITE = MlaShape("DeepSeek-V2-Lite", heads=16, kv_lora_rank=512, rope_dim=64, qk_nope_dim=128, block_size=64)


@dataclass(frozen=True)
class Sizes:
    """What one run measures, and how long it tries."""

    name: str
    decode: tuple[tuple[int, int], ...]  # (batch, context) pairs
    decode_kv_dtypes: tuple[str, ...] | None  # None: every kv_dtype the backend declares
    prefill: tuple[int, ...]  # tokens
    mla: tuple[tuple[int, int], ...]
    mla_kv_dtypes: tuple[str, ...] | None
    min_working_set: int  # KV bytes one decode/MLA measurement reads, at least ...
    llc_factor: int  # ... and at least this many times the last-level cache ...
    max_working_set: int | None  # ... but at most this
    min_reps: int  # timed rounds, at least (unless case_limit_s is reached first)
    max_reps: int  # and at most
    budget_s: float  # more rounds than min_reps (up to max_reps) while the case has taken less than this
    impl_budget_s: float | None  # an implementation so slow that min_reps rounds over every layer would
    #   take longer than this cycles fewer layers (said in the report); None: never
    case_limit_s: float  # no new round once a case has taken this long, even below min_reps
    probe_reps: int
    probe_buffer: int | None  # bytes of each bandwidth-probe buffer; None: from the LLC
    matmul_n: int
    memory_fraction: float = 0.4  # skip a case whose buffers would need more of the memory
    max_layers: int = 2048
    settle_s: float = 0.05  # a pause before each timed implementation run (see runner.measure)

    def working_set(self, llc: int | None) -> int:
        ws = max(self.min_working_set, self.llc_factor * (llc or 0))
        return min(ws, self.max_working_set) if self.max_working_set else ws

    def to_dict(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


_GRID = tuple((b, s) for s in (1024, 4096, 16384, 32768) for b in (1, 8, 64))
FULL = Sizes("full", decode=_GRID, decode_kv_dtypes=None, prefill=(512, 2048, 8192), mla=_GRID, mla_kv_dtypes=None,
             min_working_set=A.GiB, llc_factor=4, max_working_set=None, min_reps=5, max_reps=10, budget_s=10.0,
             impl_budget_s=15.0, case_limit_s=120.0, probe_reps=5, probe_buffer=None, matmul_n=4096)
QUICK = Sizes("quick", decode=((8, 4096), (1, 1024)), decode_kv_dtypes=("auto", "int8"), prefill=(2048,),
              mla=((1, 4096),), mla_kv_dtypes=("auto",), min_working_set=256 * A.MiB, llc_factor=4,
              max_working_set=A.GiB, min_reps=3, max_reps=5, budget_s=3.0, impl_budget_s=3.0,
              case_limit_s=20.0, probe_reps=5, probe_buffer=None,
              matmul_n=2048)
TINY = Sizes("tiny", decode=((2, 64),), decode_kv_dtypes=("auto", "int8"), prefill=(64,), mla=((1, 128),),
             mla_kv_dtypes=("auto",), min_working_set=A.MiB, llc_factor=0, max_working_set=A.MiB, min_reps=2,
             max_reps=2, budget_s=0.0, impl_budget_s=None, case_limit_s=60.0, probe_reps=2, probe_buffer=8 * A.MiB, matmul_n=128,
             settle_s=0.0)


def _kv_label(kv_dtype: str, dtype: str) -> str:
    return dtype if kv_dtype == "auto" else kv_dtype


@dataclass(frozen=True)
class CaseSpec:
    """One case: its kind, batch and context (prefill: context = tokens, batch 1), storage format."""

    kind: str  # "decode" | "prefill" | "mla"
    batch: int
    context: int
    kv_dtype: str = "auto"
    dtype: str = "bf16"

    @property
    def label(self) -> str:
        fmt = _kv_label(self.kv_dtype, self.dtype)
        if self.kind == "prefill":
            return f"prefill {fmt} N{self.context}"
        return f"{self.kind} {fmt} B{self.batch} S{self.context}"

    @property
    def itemsize(self) -> int:
        return DTYPES[self.dtype].itemsize

    def requires(self) -> dict[str, Any]:
        """What the case asks of the backend, as ``Capabilities.why_not`` keywords."""
        if self.kind == "decode":
            s = LLAMA3_8B
            return dict(dtype=self.dtype, kv_dtype=self.kv_dtype, head_dim=s.d, v_head_dim=s.dv,
                        block_size=s.block_size, features=["paged", "causal", "gqa"])
        if self.kind == "prefill":
            s = LLAMA3_8B
            return dict(dtype=self.dtype, head_dim=s.d, v_head_dim=s.dv, features=["dense", "causal", "gqa"])
        return dict(dtype=self.dtype, kv_dtype=self.kv_dtype, block_size=DSV2_LITE.block_size,
                    features=["mla", "causal"])

    def stored_bytes_per_layer(self) -> int:
        """KV bytes one measurement reads per layer (decode, MLA), as stored."""
        if self.kind == "decode":
            s = LLAMA3_8B
            return A.decode_bytes(A.kv_bytes_per_token_layer(s.hkv, s.d, s.dv, self.kv_dtype, self.itemsize),
                                  self.batch, self.context)
        if self.kind == "mla":
            m = DSV2_LITE
            return A.mla_bytes(A.mla_row_bytes(m.kv_lora_rank, m.rope_dim, self.kv_dtype, self.itemsize),
                               self.batch, self.context)
        s = LLAMA3_8B
        return A.prefill_bytes(self.context, s.hq, s.hkv, s.d, s.dv, self.itemsize)

    def model_bytes_per_layer(self) -> int:
        """The same KV in the model dtype (what the contiguous baseline reads)."""
        return CaseSpec(self.kind, self.batch, self.context, "auto", self.dtype).stored_bytes_per_layer()

    def flops_per_layer(self) -> int:
        if self.kind == "decode":
            s = LLAMA3_8B
            return A.decode_flops(self.batch, self.context, s.hq, s.d, s.dv)
        if self.kind == "mla":
            m = DSV2_LITE
            return A.mla_flops(self.batch, self.context, m.heads, m.kv_lora_rank, m.rope_dim)
        s = LLAMA3_8B
        return A.prefill_flops(self.context, s.hq, s.d, s.dv)

    def layers(self, working_set: int, max_layers: int = 2048) -> int:
        if self.kind == "prefill":
            return 1
        return A.layers_for(working_set, self.stored_bytes_per_layer(), max_layers)

    def memory_needed(self, layers: int) -> int:
        """Bytes the case allocates at its peak: the hal cache, the contiguous baseline's copy, the
        source values and one layer gathered by the gather baseline."""
        if self.kind == "prefill":
            return 4 * self.stored_bytes_per_layer()
        model = self.model_bytes_per_layer()
        unquantized = layers * model if self.kind == "decode" and self.kv_dtype != "auto" else 0  # hal-<dtype>
        return layers * (self.stored_bytes_per_layer() + model) + 3 * model + unquantized


def case_list(sizes: Sizes, kv_dtypes: frozenset[str], kinds: set[str] | None = None,
              dtype: str = "bf16") -> list[CaseSpec]:
    """The cases of ``sizes`` for a backend that declares ``kv_dtypes`` ("auto" first). Decode keeps
    only declared formats (the quick set: bf16, and int8 if declared); MLA cases are always listed
    so that an undeclared MLA shows as skipped with its reasons."""
    order = sorted(kv_dtypes, key=lambda k: (k != "auto", k))
    out: list[CaseSpec] = []
    if kinds is None or "decode" in kinds:
        fmts = [k for k in order if sizes.decode_kv_dtypes is None or k in sizes.decode_kv_dtypes]
        out += [CaseSpec("decode", b, s, k, dtype) for k in fmts for (b, s) in sizes.decode]
    if kinds is None or "prefill" in kinds:
        out += [CaseSpec("prefill", 1, n, "auto", dtype) for n in sizes.prefill]
    if kinds is None or "mla" in kinds:
        fmts = [k for k in order if sizes.mla_kv_dtypes is None or k in sizes.mla_kv_dtypes] or ["auto"]
        out += [CaseSpec("mla", b, s, k, dtype) for k in fmts for (b, s) in sizes.mla]
    return out


#: what each baseline is, per kind of case (printed under the tables and written to the JSON)
BASELINES: dict[str, str] = {
    "decode": ("sdpa: SDPA(enable_gqa=True) on contiguous [B, Hkv, S, D] KV in the model dtype, a copy per layer; "
               "sdpa-packed: the same with each KV head's query heads as its query rows (GQA packing); "
               "gather+sdpa: cache.read of the sequences' pages (dequantized), then SDPA(enable_gqa=True); "
               "memcpy: a copy of as many bytes (at most the probe's buffer), timed in the same rounds: %copy is "
               "against it; hal-<dtype> (quantized cases, e.g. hal-bf16): hal on the same KV in the model dtype, in the "
               "same rounds: its speedup is what the format gains; hal-cached (quantized cases, cpu): the same call with "
               "every page drawn from a pool of blocks that stays in each core's cache (as sequences sharing a "
               "prefix): its compute alone, a floor under hal's time; its GB/s is the bandwidth at which memory "
               "would stop being the limit, and hal-<dtype> / hal-cached the most the format can gain now"),
    "prefill": "sdpa: SDPA(is_causal=True, enable_gqa=True) on the same values laid out [1, H, N, D]",
    "mla": ("as for decode, MLA written as multi-query attention with the 576-wide latent row as keys and as "
            "values (output sliced to the 512 latent channels); sdpa-packed: the 16 heads as query rows; "
            "memcpy as for decode"),
}
