"""Per-request decoding options: what a client may change about how a caption is generated, and the rules.

    request = DecodingRequest(do_sample=True, temperature=0.8, seed=7)
    request.check()                                   # ValueError naming the field, or nothing
    gen = request.apply(stack.config.generation)      # the effective GenerationConfig for this request
    effective(gen)                                    # what the response echoes and the caption log keeps

The server form (POST /caption), the evaluation body (POST /evaluations) and the CLI flags all come here,
so one request means the same thing wherever it is made. The rules, each with its reason:
- Every field is optional; an absent one keeps the checkpoint's default (``GenerationConfig``).
- ``temperature``, ``top_p``, ``top_k`` and ``seed`` only act when sampling, so they need ``do_sample=true`` in
  the *same* request: "temperature 0.7" with a greedy checkpoint would otherwise be silently ignored, and a
  request says what it means whatever the checkpoint's defaults are.
- ``num_beams > 1`` with ``do_sample=true`` is refused: beam search keeps the most likely sequences, sampling
  draws one at random; the mix (HF's beam-sample) is neither, and the vLLM engine has no beam search at all.
- A request that samples and names no beams samples with one beam, and one that asks for beams is greedy,
  whatever the checkpoint's default mode is.
- A sampled request always has a seed: without one a fresh seed is drawn (< 2**53, so a JavaScript client
  reading the echo keeps it exact) and echoed, so any sampled caption can be reproduced (same seed, same
  video, same checkpoint -> same caption, on the hf engine through capguard.models.sampling).
- ``stop_on_repetition=true`` ends a row the step its last tokens repeat (``repetition_min_count`` copies in a
  row of a pattern of at least ``repetition_min_pattern_size`` tokens): vLLM's ``repetition_detection`` on the
  vllm engine, the same test as a logits processor on the hf engine (capguard.models.sampling), so both stop
  a row at the same token. The caption is the tokens up to there; its finish reason is ``repetition``. The
  two tuning fields need ``stop_on_repetition=true`` in the same request, as the sampling fields need
  ``do_sample``. The longest pattern is not a field: a row of N tokens can only show patterns of N / count.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, fields, replace

from capguard.models.config import GenerationConfig

MAX_TEMPERATURE = 5.0    # above this the next-token distribution is near uniform: noise, not captions
MAX_NUM_BEAMS = 8        # each beam is a sequence in the batch: bounds a request's memory and time
MAX_SEED = 2**64 - 1     # what torch.Generator.manual_seed (and vLLM's per-request seed) accepts
DRAWN_SEED_BITS = 53     # drawn seeds stay exact in a JSON number read by JavaScript
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "seed")   # act only when do_sample is true
MAX_REPETITION_COUNT = 16    # copies before a stop: more than this is no longer an early stop at 256 tokens
MAX_REPETITION_PATTERN = 256   # tokens: the server's max_new_tokens cap; a longer pattern could never repeat
REPETITION_FIELDS = ("repetition_min_count", "repetition_min_pattern_size")   # act only with stop_on_repetition


@dataclass(frozen=True)
class DecodingRequest:
    """The decoding fields of one request; None = the checkpoint's default."""

    do_sample: bool | None = None             # sample the next token instead of taking the most likely one
    temperature: float | None = None          # (0, MAX_TEMPERATURE]: logits / temperature before sampling
    top_p: float | None = None                # (0, 1]: sample within the smallest set holding this much mass
    top_k: int | None = None                  # >= 0: sample within the k most likely tokens; 0 = no limit
    num_beams: int | None = None              # [1, MAX_NUM_BEAMS]: beam search width (greedy when 1)
    repetition_penalty: float | None = None   # > 0: divides the logits of tokens already generated (1 = off)
    seed: int | None = None                   # [0, MAX_SEED]: the row's own random stream
    stop_on_repetition: bool | None = None    # end the row once its last tokens repeat (finish reason "repetition")
    repetition_min_count: int | None = None   # [2, MAX_REPETITION_COUNT]: copies in a row that stop it
    repetition_min_pattern_size: int | None = None   # [1, MAX_REPETITION_PATTERN]: tokens in the shortest pattern

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def given(self) -> dict:
        """The fields the request set. Example: DecodingRequest(top_k=5).given() -> {"top_k": 5}."""
        return {name: getattr(self, name) for name in self.names() if getattr(self, name) is not None}

    def check(self) -> None:
        """Raise ValueError (naming the field and what to send instead) when the request is not valid."""
        problems = []
        checks = {
            "temperature": (lambda v: 0 < v <= MAX_TEMPERATURE, f"must be > 0 and <= {MAX_TEMPERATURE}"),
            "top_p": (lambda v: 0 < v <= 1, "must be > 0 and <= 1"),
            "top_k": (lambda v: v >= 0, "must be >= 0 (0: no top-k limit)"),
            "num_beams": (lambda v: 1 <= v <= MAX_NUM_BEAMS, f"must be between 1 and {MAX_NUM_BEAMS}"),
            "repetition_penalty": (lambda v: v > 0, "must be > 0 (1: no penalty)"),
            "seed": (lambda v: 0 <= v <= MAX_SEED, f"must be between 0 and {MAX_SEED} (a 64-bit unsigned int)"),
            "repetition_min_count": (lambda v: 2 <= v <= MAX_REPETITION_COUNT,
                                     f"must be between 2 and {MAX_REPETITION_COUNT} (copies in a row)"),
            "repetition_min_pattern_size": (lambda v: 1 <= v <= MAX_REPETITION_PATTERN,
                                            f"must be between 1 and {MAX_REPETITION_PATTERN} (tokens)"),
        }
        for name, value in self.given().items():
            if name in checks and not checks[name][0](value):
                problems.append(f"{name} {checks[name][1]}, got {value}")
        if self.do_sample is not True:
            for name in SAMPLING_FIELDS:
                if getattr(self, name) is not None:
                    problems.append(f"{name} needs do_sample=true (it only acts when sampling); "
                                    f"send do_sample=true or leave {name} out")
        if self.stop_on_repetition is not True:
            for name in REPETITION_FIELDS:
                if getattr(self, name) is not None:
                    problems.append(f"{name} needs stop_on_repetition=true (it only tunes that stop); "
                                    f"send stop_on_repetition=true or leave {name} out")
        if self.do_sample is True and self.num_beams is not None and self.num_beams > 1:
            problems.append(f"num_beams={self.num_beams} with do_sample=true: beam search keeps the likeliest "
                            "sequences while sampling draws one at random; use one or the other")
        if problems:
            raise ValueError("; ".join(problems))

    def apply(self, base: GenerationConfig) -> GenerationConfig:
        """The effective GenerationConfig: ``base`` (a checkpoint's defaults) with this request's fields.

        Checks first (ValueError). A sampled result always carries a seed (drawn when none is given).
        Example: base greedy, DecodingRequest(do_sample=True, temperature=0.7) -> do_sample=True,
        temperature=0.7, num_beams=1, seed=<drawn>.
        """
        self.check()
        gen = replace(base, **self.given())
        if self.do_sample is True and self.num_beams is None:
            gen = replace(gen, num_beams=1)
        if self.num_beams is not None and self.num_beams > 1 and self.do_sample is None:
            gen = replace(gen, do_sample=False)
        if gen.do_sample and gen.num_beams == 1 and gen.seed is None:
            gen = replace(gen, seed=draw_seed())
        return gen


def draw_seed() -> int:
    """A fresh seed for a sampled request that named none (< 2**53, see the module docstring)."""
    return secrets.randbits(DRAWN_SEED_BITS)


def effective(gen: GenerationConfig) -> dict:
    """The decoding a caption was made with, as a response echoes it and the caption log keeps it.

    Sampling-only fields are None for a greedy or beam-search caption (they did not act), and the repetition
    stop's two figures are None when it was off. Example: greedy -> {"do_sample": False, "temperature": None,
    "top_p": None, "top_k": None, "num_beams": 1, "repetition_penalty": 1.0, "seed": None,
    "stop_on_repetition": False, "repetition_min_count": None, "repetition_min_pattern_size": None}.
    """
    sampled, stops = bool(gen.do_sample), bool(gen.stop_on_repetition)
    return {"do_sample": sampled,
            "temperature": float(gen.temperature) if sampled else None,
            "top_p": float(gen.top_p) if sampled else None,
            "top_k": int(gen.top_k) if sampled else None,
            "num_beams": int(gen.num_beams),
            "repetition_penalty": float(gen.repetition_penalty),
            "seed": gen.seed if sampled else None,
            "stop_on_repetition": stops,
            "repetition_min_count": int(gen.repetition_min_count) if stops else None,
            "repetition_min_pattern_size": int(gen.repetition_min_pattern_size) if stops else None}


__all__ = ["MAX_NUM_BEAMS", "MAX_REPETITION_COUNT", "MAX_REPETITION_PATTERN", "MAX_SEED", "MAX_TEMPERATURE",
           "REPETITION_FIELDS", "SAMPLING_FIELDS", "DecodingRequest", "draw_seed", "effective"]
