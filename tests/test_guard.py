"""The live collapse guard (server/guard.py): windowing, verdicts, hysteresis, restore. Pure and fast."""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest

import capguard.server.guard as guard_module
from capguard.models.diversity import diversity_report
from capguard.models.rules import GuardThresholds, tripped_rules
from capguard.models.semantic import vendi_score
from capguard.server.guard import Guard, GuardRegistry, GuardSettings, GuardState
from tests.paraphrases import paraphrase_stream

FIELD_REPORT_EPOCHS = [9, 6, 4, 1, 4, 6]  # unique captions out of 97 validation videos, epochs 1-6
SUNNY = "맑고 화창한 낮의 풍경을 담은 영상"   # epoch 5-6 representative captions, one word apart
SUNNY_2 = "맑고 화창한 낮의 광경을 담은 영상"


def sha(i: int) -> str:
    return f"{i:064x}"


def random_captions(n: int, seed: int = 0) -> list[str]:
    """n distinct captions of random Hangul syllables: no two are near-duplicates."""
    rng = np.random.default_rng(seed)
    out: set[str] = set()
    while len(out) < n:
        syllables = [chr(0xAC00 + int(c)) for c in rng.integers(0, 11172, 18)]
        out.add(" ".join("".join(syllables[i:i + 3]) for i in range(0, 18, 3)))
    return sorted(out, key=lambda c: rng.random())


def one_syllable_variants(base: str, n: int, seed: int = 0) -> list[str]:
    """n distinct captions, each `base` with one Hangul syllable replaced (Indel similarity 1 - 1/L)."""
    rng = np.random.default_rng(seed)
    positions = [i for i, ch in enumerate(base) if ch != " "]
    out: list[str] = []
    while len(out) < n:
        pos = positions[int(rng.integers(len(positions)))]
        text = base[:pos] + chr(0xAC00 + int(rng.integers(11172))) + base[pos + 1:]
        if text != base and text not in out:
            out.append(text)
    return out


def matched_embeddings(n: int, dim: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(text, video), each (n, dim): every caption's embedding lies near its own video's."""
    rng = np.random.default_rng(seed)
    video = rng.standard_normal((n, dim)).astype(np.float32)
    text = video + 0.3 * rng.standard_normal((n, dim)).astype(np.float32)
    return text, video


def feed(guard: Guard, captions, text=None, video=None, siglip=None, start: int = 0) -> list[GuardState]:
    return [guard.observe(sha(start + i), c, None if text is None else text[i], None if video is None else video[i],
                          None if siglip is None else siglip[i]) for i, c in enumerate(captions)]


def small(**kw) -> GuardSettings:
    return GuardSettings(**{"window": 20, "min_captions": 10, **kw})


# --------------------------------------------------------------------------------------------- verdicts


def test_no_verdict_before_min_captions_even_when_collapsed():
    states = feed(Guard("c", GuardSettings()), ["똑같은 캡션"] * 30)
    assert [s.status for s in states[:29]] == ["warming_up"] * 29
    assert all(s.tripped == [] and s.newly_tripped == [] for s in states[:29])
    assert states[28].unique_ratio == pytest.approx(1 / 29)   # figures are reported while warming up
    assert states[29].status == "collapsed"                    # the 30th caption gives the first verdict


def test_healthy_stream_stays_ok_and_window_is_bounded():
    n = 250
    text, video = matched_embeddings(n)
    siglip = np.linspace(0.2, 0.4, n)
    states = feed(Guard("c", GuardSettings()), random_captions(n), text, video, siglip)
    assert {s.status for s in states[29:]} == {"ok"}
    assert all(s.tripped == [] for s in states)
    last = states[-1]
    assert last.window_captions == 100
    assert last.unique_ratio == last.near_unique_ratio == 1.0
    assert last.top_mode_share == pytest.approx(0.01)
    assert last.repeat_probability == 0.0
    assert last.grounding_r1 > 0.9 and last.grounding_margin > 0
    assert last.siglip_mean == pytest.approx(siglip[-100:].mean())
    assert last.metrics_age == 0


@pytest.mark.parametrize("epoch, unique", list(enumerate(FIELD_REPORT_EPOCHS, start=1)))
def test_field_report_epochs_are_collapsed(epoch, unique):
    # epochs 1-4: a few unrelated captions; epochs 5-6: one-word variants of the sunny-day caption
    pool = random_captions(unique, seed=epoch) if epoch <= 4 else [SUNNY, SUNNY_2, *one_syllable_variants(
        SUNNY, unique - 2, seed=epoch)]
    captions = [pool[i % unique] for i in range(97)]
    states = feed(Guard("c", GuardSettings()), captions)
    first = next(i for i, s in enumerate(states) if s.status == "collapsed")
    assert first + 1 == 30  # collapsed on the first verdict, well before 50 captions
    assert all(s.status == "collapsed" for s in states[first:])
    assert states[-1].unique_ratio == pytest.approx(unique / 97)
    assert {"unique_ratio", "near_unique_ratio"} <= set(states[-1].tripped)
    # round robin over 9 or 6 captions keeps every mode at 1/9 or 1/6 of the window, under the 0.2 line
    assert ("top_mode_share" in states[-1].tripped) == (states[-1].top_mode_share > 0.2)
    if epoch >= 5:  # near-duplicates: one cluster however many exact variants
        assert states[-1].modes[0]["variants"] == unique and states[-1].near_unique_ratio == pytest.approx(1 / 97)
    fired = [rule for s in states for rule in s.newly_tripped]
    assert sorted(fired) == sorted(set(fired)) == sorted(states[-1].tripped)  # each rule trips once


def test_same_video_repeated_counts_once():
    g = Guard("c", GuardSettings())
    for _ in range(100):
        s = g.observe(sha(7), "같은 영상을 다시 올렸다")
    assert s.window_captions == 1 and s.status == "warming_up"
    # interleaved with 40 other videos: still one row for it, and no false collapse
    for i, caption in enumerate(random_captions(40)):
        g.observe(sha(1000 + i), caption)
        s = g.observe(sha(7), "같은 영상을 다시 올렸다")
    assert s.window_captions == 41 and s.status == "ok" and s.unique_ratio == 1.0


def test_repeat_refreshes_the_video_and_eviction_is_least_recently_seen():
    g = Guard("c", GuardSettings(window=3, min_captions=1, top_modes=5))
    for vid, caption in [(1, "가나다라마"), (2, "바사아자차"), (3, "카타파하가"), (1, "나다라마바사")]:
        g.observe(sha(vid), caption)
    s = g.observe(sha(4), "자차카타파하")  # evicts video 2 (video 1 was seen again after it)
    assert s.window_captions == 3
    assert sorted(m["representative"] for m in s.modes) == sorted(["카타파하가", "나다라마바사", "자차카타파하"])


def test_near_duplicate_stream_trips_near_rules_but_not_exact_unique():
    bases = [SUNNY, "도심 한가운데 회색 건물을 담은 영상", "해질녘 한옥 골목을 천천히 걷는 영상"]
    variants = {b: [SUNNY_2, *one_syllable_variants(b, 30, seed=1)] if b == SUNNY else one_syllable_variants(b, 30)
                for b in bases}
    captions = []
    for i in range(100):  # per template: base, variant, variant, base, ... so the base leads its cluster
        base = bases[i % 3]
        captions.append(base if (i // 3) % 3 == 0 else variants[base].pop(0))
    s = feed(Guard("c", GuardSettings()), captions)[-1]
    assert s.unique_ratio >= 0.5                      # exact counting sees a varied window...
    # ...near-duplicate counting does not; nor do content keys (a swapped syllable is another word), which
    # is why the syllable rule stays beside the content rule
    assert s.tripped == ["near_unique_ratio", "top_mode_share"]
    assert s.near_unique_ratio == pytest.approx(3 / 100)
    assert s.modes[0]["variants"] > 10 and s.grounding_r1 is None


def test_identical_text_embeddings_trip_grounding():
    n = 60
    text, video = matched_embeddings(n)
    text[:] = text[0]  # every caption "means" the same thing, whatever its words
    s = feed(Guard("c", GuardSettings()), random_captions(n), text, video)[-1]
    assert s.grounding_r1 == 0.0 and s.tripped == ["grounding_r1"] and s.status == "collapsed"


def test_grounding_skipped_without_enough_embeddings():
    n = 50
    text, video = matched_embeddings(n)
    text[:] = text[0]
    captions = random_captions(n)
    g = Guard("c", GuardSettings())
    feed(g, captions[:25], text, video)                 # 25 scored rows < min_captions (30)
    s = feed(g, captions[25:], start=25)[-1]            # then the scorer is off
    assert s.grounding_r1 is None and s.status == "ok"


# --------------------------------------------------------------------------------------------- hysteresis


def test_collapsed_guard_does_not_flap_back_on_a_few_healthy_captions():
    settings = small(clear_after=5)
    g = Guard("c", settings)
    feed(g, ["늘 같은 말"] * 20)
    healthy = random_captions(40)
    window = ["늘 같은 말"] * 20
    first_pass = None
    for i, caption in enumerate(healthy):
        window = (window + [caption])[-20:]
        s = g.observe(sha(100 + i), caption)
        raw = tripped_rules(diversity_report(window, with_self_bleu=False), settings.thresholds)
        if not raw and first_pass is None:
            first_pass = i
        if first_pass is None or i < first_pass + 4:
            assert s.status == "collapsed", i
        if first_pass is not None and i < first_pass + 4:
            assert s.clears_in and all(v == 5 - (i - first_pass + 1) for v in s.clears_in.values())
    assert first_pass is not None and first_pass >= 15  # top mode share needs 16 healthy captions to pass
    assert g.state().status == "ok" and g.state().tripped == [] and g.state().clears_in == {}


def reference_hysteresis(raw: list[list[str]], clear_after: int) -> tuple[list[str], list[list[str]]]:
    """Spec of the hysteresis: a rule is tripped at t iff it failed at one of evaluations t-c+1..t."""
    status, newly = [], []
    for t in range(len(raw)):
        tripped_at = [set().union(*raw[max(0, u - clear_after + 1):u + 1]) for u in (t - 1, t)]
        if t == 0:
            tripped_at[0] = set()
        status.append("collapsed" if tripped_at[1] else "ok")
        newly.append(sorted(tripped_at[1] - tripped_at[0]))
    return status, newly


def test_hysteresis_matches_its_spec_on_a_stream_hovering_at_the_line():
    settings = small(clear_after=6)
    rng = np.random.default_rng(3)
    healthy = iter(random_captions(300, seed=5))
    # one stuck caption in ~25% of the window: its share keeps crossing the 0.2 line (4 vs 5 of 20)
    captions = [next(healthy) if rng.random() < 0.75 else "늘 같은 말" for _ in range(300)]
    states = feed(Guard("c", settings), captions)
    raw = [tripped_rules(diversity_report(captions[max(0, t - 19):t + 1], with_self_bleu=False), settings.thresholds)
           for t in range(9, 300)]
    want_status, want_newly = reference_hysteresis(raw, settings.clear_after)
    assert [s.status for s in states[9:]] == want_status
    assert [sorted(s.newly_tripped) for s in states[9:]] == want_newly
    raw_trips = sum(bool(b) and not a for a, b in zip(raw, raw[1:], strict=False))
    counted_trips = sum(len(s.newly_tripped) for s in states)
    assert raw_trips >= 10 and counted_trips <= raw_trips / 2  # the stream hovers; the trip counter does not


# --------------------------------------------------------------------------------------------- cost policy


def test_exact_unique_is_live_between_recomputes_and_matches_diversity():
    settings = GuardSettings(window=50, min_captions=10, recompute_every=25)
    g = Guard("c", settings)
    captions = random_captions(40) + ["고장 난 모델의 한 문장"] * 40
    window: dict[str, str] = {}
    tripped_at = None
    for i, caption in enumerate(captions):
        vid = sha(i % 70)  # videos 0-9 come back (refresh) at the end
        s = g.observe(vid, caption)
        window.pop(vid, None)
        window[vid] = caption
        window = dict(list(window.items())[-50:])
        report = diversity_report(list(window.values()), with_self_bleu=False)
        assert s.window_captions == report.n
        assert s.unique_ratio == report.unique_ratio and s.repeat_probability == report.repeat_probability
        if tripped_at is None and report.unique_ratio < 0.5:
            tripped_at = i
            assert "unique_ratio" in s.newly_tripped and s.metrics_age > 0  # no recompute was due
    assert tripped_at is not None


def test_first_verdict_uses_fresh_full_metrics():
    g = Guard("c", GuardSettings(window=1000, min_captions=30, recompute_every=100))
    states = feed(g, [SUNNY, SUNNY_2, *one_syllable_variants(SUNNY, 28)])  # 30 exact-distinct near-duplicates
    assert states[28].status == "warming_up" and states[28].near_unique_ratio is None  # not computed yet
    assert states[29].metrics_age == 0 and states[29].near_unique_ratio == pytest.approx(1 / 30)
    assert states[29].unique_ratio == 1.0 and states[29].tripped == ["near_unique_ratio", "top_mode_share"]


@pytest.mark.parametrize("window, expected", [(100, 1), (150, 3), (1000, 100), (10_000, 10_000)])
def test_auto_recompute_every(window, expected):
    assert GuardSettings(window=window).effective_recompute_every == expected
    assert GuardSettings(window=window, recompute_every=7).effective_recompute_every == 7


# --------------------------------------------------------------------------------------------- restore


def mixed_stream(n: int, seed: int = 0) -> list[dict]:
    """Healthy, then collapsing, then recovering, with repeats, scores and (mostly) embeddings."""
    rng = np.random.default_rng(seed)
    text, video = matched_embeddings(n, seed=seed)
    healthy = iter(random_captions(n, seed=seed))
    rows = []
    for i in range(n):
        phase = 0.9 if i < n // 3 else 0.15 if i < 2 * n // 3 else 0.7
        caption = next(healthy) if rng.random() < phase else "멈춰 버린 모델의 한 문장"
        if rng.random() < 0.1:   # a loop now and then: the looping share must restore too
            caption = f"{caption}. {caption}. {caption}"
        vid = sha(int(rng.integers(0, i + 1)) if rng.random() < 0.1 else 10_000 + i)
        scored = rng.random() < 0.9
        rows.append({"video_sha256": vid, "caption": caption, "siglip": float(rng.random()),
                     "text_emb": text[i] if scored else None, "video_emb": video[i] if scored else None})
    return rows


@pytest.mark.parametrize("recompute_every, clear_after", [(1, 5), (7, 3), (3, 1)])
def test_restore_equals_observing(recompute_every, clear_after):
    settings = GuardSettings(window=30, min_captions=10, recompute_every=recompute_every, clear_after=clear_after)
    rows = mixed_stream(150)
    live = Guard("c", settings)
    statuses = set()
    for n, row in enumerate(rows, start=1):
        live.observe(**row)
        statuses.add(live.state().status)
        if n % 4 == 0 or n < 12:
            restored = Guard("c", settings).restore(rows[:n])
            assert restored.to_dict() == live.state().to_dict(), n
    assert statuses == {"warming_up", "ok", "collapsed"}  # the stream exercised every state


def test_new_figures_are_live_and_restored():
    # content keys, looping share and Vendi are window figures too: restore gives the same state, and the
    # live values equal the offline functions on the window's captions
    settings = GuardSettings(window=30, min_captions=10)
    rows = mixed_stream(80, seed=3)
    live = Guard("c", settings)
    for row in rows:
        state = live.observe(**row)
    window = {}
    for row in rows:
        window.pop(row["video_sha256"], None)
        window[row["video_sha256"]] = row
    last = list(window.values())[-30:]
    report = diversity_report([r["caption"] for r in last], with_self_bleu=False, with_distinct_n=False)
    assert state.content_unique_ratio == pytest.approx(report.content_unique_ratio)
    assert state.degenerate_share == pytest.approx(report.degenerate_share) and state.degenerate_share > 0
    assert state.vendi_score is not None and 1.0 <= state.vendi_score <= 30
    assert Guard("c", settings).restore(rows).to_dict() == state.to_dict()


def test_vendi_score_follows_the_window_on_its_cadence():
    g = Guard("c", small())
    text, video = matched_embeddings(40)
    states = feed(g, random_captions(40), text, video)
    assert states[8].vendi_score is None or states[8].vendi_score > 0   # scored every 10 observations
    exact = vendi_score(text[-20:])
    assert states[-1].vendi_score == pytest.approx(exact, rel=1e-6)     # 40 is a beat: fresh
    assert feed(Guard("c", small()), random_captions(12))[-1].vendi_score is None   # no scorer, no Vendi


def test_loops_trip_degenerate_share_and_a_given_kind_wins():
    captions = random_captions(100)
    loops = [f"{c}. {c}. {c}" if i % 5 == 0 else c for i, c in enumerate(captions)]   # 20 % loop
    s = feed(Guard("c", GuardSettings()), loops)[-1]
    assert s.degenerate_share == pytest.approx(0.2) and s.tripped == ["degenerate_share"]
    # the caller's kind (judged with token counts) is what counts: "token_limit" alone is not a loop
    g = Guard("c", small())
    for i, c in enumerate(captions[:20]):
        s = g.observe(sha(i), c, degenerate="repeated_ngram" if i < 3 else "token_limit")
    assert s.degenerate_share == pytest.approx(3 / 20) and "degenerate_share" in s.tripped
    with pytest.raises(ValueError, match="degenerate must be None or one of"):
        g.observe(sha(0), "캡션", degenerate="loop")


def test_paraphrase_stream_trips_content_unique():
    s = feed(Guard("c", GuardSettings()), paraphrase_stream(97))[-1]
    assert s.unique_ratio == 1.0 and s.content_unique_ratio < 0.2
    assert "content_unique_ratio" in s.tripped and s.status == "collapsed"


def test_restore_of_many_rows_costs_a_few_recomputes(monkeypatch):
    calls = []
    real = guard_module.diversity_report
    monkeypatch.setattr(guard_module, "diversity_report", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = GuardSettings()
    s = Guard("c", settings).restore({"video_sha256": sha(i), "caption": "또 같은 캡션"} for i in range(5000))
    assert s.status == "collapsed" and s.window_captions == 100
    assert len(calls) <= settings.clear_after + 3


def test_restore_keeps_a_collapse_and_empty_restore_warms_up():
    g = Guard("c", GuardSettings())
    assert g.restore([]).status == "warming_up"
    s = g.restore([{"video_sha256": sha(i), "caption": "같은 말"} for i in range(40)])
    assert s.status == "collapsed" and s.window_captions == 40
    with pytest.raises(ValueError, match="lacks 'caption'"):
        g.restore([{"video_sha256": sha(1)}])


# --------------------------------------------------------------------------------------------- API surface


def test_to_dict_is_strict_json():
    n = 40
    text, video = matched_embeddings(n)
    g = Guard("c", GuardSettings())
    warming = g.observe(sha(0), "첫 캡션", siglip=np.float32(0.5))
    states = [warming, *feed(g, random_captions(n), text, video, np.float32(np.linspace(0, 1, n)), start=1)]
    states.append(feed(g, ["같은 말"] * 100, start=100)[-1])
    for s in states:
        d = s.to_dict()
        assert json.loads(json.dumps(d, allow_nan=False)) == d
    assert states[0].to_dict()["near_unique_ratio"] == 1.0 and states[0].to_dict()["grounding_r1"] is None
    assert states[-1].to_dict()["status"] == "collapsed"
    assert states[-1].to_dict()["thresholds"] == {"min_unique_ratio": 0.5, "min_near_unique_ratio": 0.5,
                                                  "max_top_mode_share": 0.2, "min_grounding_r1": 0.1,
                                                  "near_dup_threshold": 0.9, "min_content_unique_ratio": 0.5,
                                                  "max_degenerate_share": 0.1}


def test_bad_inputs():
    g = Guard("c", GuardSettings())
    with pytest.raises(ValueError, match="both text_emb and video_emb"):
        g.observe(sha(0), "캡션", text_emb=np.ones(4))
    with pytest.raises(ValueError, match="same size"):
        g.observe(sha(0), "캡션", np.ones(4), np.ones(5))
    with pytest.raises(TypeError):
        g.observe(sha(0), None)
    g.observe(sha(0), "캡션", np.ones(4), np.ones(4))
    with pytest.raises(ValueError, match="does not match the window"):
        g.observe(sha(1), "캡션 둘", np.ones(8), np.ones(8))
    s = g.observe(sha(2), "캡션 셋", np.full(4, np.nan), np.ones(4), siglip=float("nan"))  # dropped, not raised
    assert s.window_captions == 2 and s.siglip_mean is None
    with pytest.raises(ValueError, match="never reach a verdict"):
        GuardSettings(window=10, min_captions=30)


def test_settings_from_flat_options():
    s = GuardSettings.from_options({"window": 50, "min_captions": 20, "min_unique_ratio": 0.4,
                                    "near_dup_threshold": 0.85})
    assert s.window == 50 and s.min_captions == 20
    assert s.thresholds == GuardThresholds(min_unique_ratio=0.4, near_dup_threshold=0.85)
    with pytest.raises(ValueError, match="windw"):
        GuardSettings.from_options({"windw": 5})


def test_server_settings_default_to_the_guards_defaults():
    """The defaults live once (models/rules.py): Settings' guard_* fields build exactly GuardSettings()."""
    from capguard.server.settings import Settings

    assert GuardSettings.from_options(Settings().guard_options()) == GuardSettings()


def test_registry_and_concurrent_observers():
    registry = GuardRegistry(small())
    g = registry.get("a")
    assert registry.get("a") is g and registry.get("b") is not g
    captions = random_captions(200)

    def worker(k: int) -> None:
        for i in range(k, 200, 4):
            g.observe(sha(i), captions[i])

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert g.state().window_captions == 20 and g.state().status == "ok"


def test_registry_configure_applies_a_checkpoints_own_thresholds():
    registry = GuardRegistry(GuardSettings(window=50))
    shared = registry.get("other")
    guard = registry.configure("demo", {"near_dup_threshold": 0.98})
    assert registry.get("demo") is guard
    assert guard.settings.thresholds.near_dup_threshold == 0.98 and guard.settings.window == 50
    assert shared.settings.thresholds.near_dup_threshold == registry.settings.thresholds.near_dup_threshold
    with pytest.raises(ValueError, match="unknown guard threshold"):
        registry.configure("demo", {"near_dup": 0.9})
