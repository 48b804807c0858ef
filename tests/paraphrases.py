"""A stream of re-wordings of one generic Korean sentence: the collapse that syllable similarity misses.

Every caption says "this video shows the city scenery" (issue 15, section 3), varied in form only:
particles (도시의 / 도시), endings (입니다 / 이다 / 합니다 / 한다), synonyms (도시 / 도심, 풍경 / 경관),
verbs (보여주는 / 담은 / 나타낸), word order (noun phrase first, or 영상은 first) and a determiner (이).
"""

from __future__ import annotations

import itertools
import random

PLACES = ["도시", "도심"]
SCENES = ["풍경", "경관"]
GENITIVE = ["의 ", " "]
THIS = ["", "이 "]
ATTRIBUTIVE = ["보여주는", "담은", "나타낸"]
COPULA_ENDINGS = ["영상입니다.", "영상이다.", "영상"]
PREDICATE_ENDINGS = ["보여준다.", "보여줍니다.", "담고 있다.", "담았습니다.", "나타낸다."]


def paraphrase_stream(n: int = 97, seed: int = 0) -> list[str]:
    """n distinct re-wordings (at most 264), in a seeded random order.

    Example: paraphrase_stream(2) -> e.g. ["도심 경관을 담은 영상입니다.", "이 영상은 도시의 풍경을 보여준다."].
    """
    noun_first = [f"{this}{place}{gen}{scene}을 {verb} {end}"
                  for this, place, gen, scene, verb, end in
                  itertools.product(THIS, PLACES, GENITIVE, SCENES, ATTRIBUTIVE, COPULA_ENDINGS)]
    video_first = [f"{this}영상은 {place}{gen}{scene}을 {verb}"
                   for this, place, gen, scene, verb in itertools.product(THIS, PLACES, GENITIVE, SCENES,
                                                                          PREDICATE_ENDINGS)]
    pool = noun_first + video_first
    if n > len(pool):
        raise ValueError(f"only {len(pool)} distinct re-wordings; asked for {n}")
    random.Random(seed).shuffle(pool)
    return pool[:n]
