"""Personalization on the tiny model's real LiteRT plan: personal suggestions come from the personal
weights and cache, a phone whose held-back text gets worse falls back, the summed report is a
histogram, and the simulation's loop gives the device's counts exactly."""
from __future__ import annotations

import numpy as np
import pytest

from contract.tasks.personal import (BUCKETS, PersonalCache, PersonalReport, PersonalSpec, evaluate, fairness,
                               personalize, split, summarize)
from contract.model.text import BOS_ID, to_sequences
from device_runtime.personalization import PersonalModel, Personalizer, personal_model
from device_runtime.predictor import Predictor
from emulation.models import tiny_corpus, tiny_model
from tflite_export import export_app_model
from tflite_export.reader import load_app_model, load_plan


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    corpus = tiny_corpus()
    model = tiny_model(tmp_path_factory.mktemp("personal"), corpus)
    return corpus, model, load_plan(model.plan_dir / "plan.manifest.json")


def phrase(corpus, offset: int) -> list[str]:
    """Four distinct ordinary words of the tiny vocabulary."""
    words = [w for w in corpus.vocab.tokens if w.isalpha()]
    return words[offset:offset + 4]


def top(model: PersonalModel, ids: list[int], app=None) -> int:
    return model.suggest(ids, app)[0][0]


def test_personal_suggestions_come_from_the_personal_weights(world, tmp_path):
    corpus, model, plan = world
    words = phrase(corpus, 5)
    windows = to_sequences([" ".join(words) + "."] * 60, corpus.vocab, plan.seq_len)
    context = [BOS_ID] + corpus.vocab.encode(words[:3])
    target = corpus.vocab.id(words[3])
    weights_only = PersonalSpec(epochs=20, lr=1.0, cache_weight=0.0)
    app = load_app_model(export_app_model(model.config, model.flat, corpus.vocab, tmp_path / "app"))
    assert app.suggest(context)[0][0] != target                 # the global model does not know the phrase
    result = personalize(plan, model.flat, windows, weights_only)
    assert not result.fell_back and result.cache is None
    assert np.abs(result.flat - model.flat).max() > 1e-3       # fine-tuned through `personalize`
    after = personal_model(load_plan(model.plan_dir / "plan.manifest.json"), result.flat, model.flat, None,
                           weights_only, 0)
    assert after.mode == "plan" and top(after, context) == target   # from the personal weights alone

    cache_only = PersonalSpec(epochs=0, cache_weight=0.5)
    cached = personalize(plan, model.flat, windows, cache_only)
    np.testing.assert_array_equal(cached.flat, model.flat)      # no fine-tuning: the global weights
    mine = personal_model(plan, cached.flat, model.flat, cached.cache, cache_only, 0)
    assert mine.mode == "app" and top(mine, context, app) == target     # the app model + the cache


def test_only_the_exported_personal_layers_move(world, tmp_path):
    from models.model import weight_layout
    from tflite_export import export_plan

    corpus, model, _ = world
    manifest = export_plan(model.config, model.flat, corpus.vocab, tmp_path / "plan",
                           personal_layers=("output_bias",))
    plan = load_plan(manifest)
    assert plan.manifest.personal_layers == ["output_bias"]
    windows = to_sequences([" ".join(phrase(corpus, 5)) + "."] * 20, corpus.vocab, plan.seq_len)
    result = personalize(plan, model.flat, windows, PersonalSpec(epochs=2, lr=0.5, cache_weight=0.0))
    moved = {e.name for e in weight_layout(model.config).entries
             if np.abs(result.flat[e.offset:e.offset + e.size] - model.flat[e.offset:e.offset + e.size]).max() > 0}
    assert moved == {"output_bias"}
    with pytest.raises(ValueError, match="personal_layers must name"):
        export_plan(model.config, model.flat, corpus.vocab, tmp_path / "bad", personal_layers=("nope",))

    # A bias-only personal model is served by the (here float) app model: exactly the plan's answer.
    app = load_app_model(export_app_model(model.config, model.flat, corpus.vocab, tmp_path / "app", quantize=False))
    mine = personal_model(plan, result.flat, model.flat, None, PersonalSpec(cache_weight=0.0), 0)
    assert mine.mode == "app"
    plan.set_weights(result.flat)
    for ids in ([BOS_ID], [BOS_ID] + corpus.vocab.encode(phrase(corpus, 5)[:3])):
        np.testing.assert_allclose(mine.probabilities(ids, app), plan.next_probs(ids), atol=1e-6)

    # Stored on the phone, such a model keeps only the bias it moved, and loads without a plan.
    store = Personalizer(tmp_path / "phone")
    spec = PersonalSpec(epochs=2, lr=0.5, cache_weight=0.0, fallback_nats=1e9)
    store.refresh(manifest, model.checkpoint, windows, spec, version=1)
    loaded = Personalizer(tmp_path / "phone").load()
    assert store.meta()["mode"] == "app" and loaded.mode == "app" and loaded.plan is None
    assert not (store.dir / "weights.safetensors").exists() and (store.dir / "bias_delta.npy").exists()
    ids = [BOS_ID] + corpus.vocab.encode(phrase(corpus, 5)[:3])
    np.testing.assert_allclose(loaded.probabilities(ids, app), mine.probabilities(ids, app), atol=1e-6)


def test_a_phone_whose_held_back_text_gets_worse_falls_back_to_the_global_model(world, tmp_path):
    corpus, model, plan = world
    a, b = phrase(corpus, 5), phrase(corpus, 12)
    usual = " ".join(a[:3] + [b[3]]) + "."                       # what the user types now ...
    once = " ".join(a) + "."                                     # ... and a phrase it typed a lot before
    trained = load_plan(model.plan_dir / "plan.manifest.json")   # a global model that knows `usual`
    trained.set_weights(model.flat)
    for _ in range(120):
        trained.train_windows(to_sequences([usual] * 16, corpus.vocab, plan.seq_len), 1.0)
    global_flat = trained.get_weights()
    windows = to_sequences([once] * 40 + [usual] * 10, corpus.vocab, plan.seq_len)   # typing order
    spec = PersonalSpec(epochs=3, lr=0.5, cache_weight=0.6)
    result = personalize(plan, global_flat, windows, spec)
    base, personal = result.validation
    assert personal.top1 < base.top1 and result.fell_back and result.flat is None

    from contract.model.weights import save_checkpoint

    checkpoint = save_checkpoint(tmp_path / "v3.safetensors", plan.layout, global_flat, {"round": 3})
    store = Personalizer(tmp_path / "phone")
    store.refresh(model.plan_dir / "plan.manifest.json", checkpoint, windows, spec, version=3)
    assert store.meta()["fell_back"] and store.load() is None and not store.due(3) and store.due(4)
    app = export_app_model(model.config, global_flat, corpus.vocab, tmp_path / "app", model_version=3)
    predictor = Predictor()
    predictor.install(app)
    predictor.set_personal(store.load())
    context = [BOS_ID] + corpus.vocab.encode(a[:3])
    assert not predictor.personal_active
    assert predictor.suggest_ids(context)[0][0] == corpus.vocab.id(b[3])   # the global model's answer


def test_a_kept_personal_model_serves_the_keyboard_until_a_new_version(world, tmp_path):
    corpus, model, plan = world
    words = phrase(corpus, 5)
    windows = to_sequences([" ".join(words) + "."] * 60, corpus.vocab, plan.seq_len)
    store = Personalizer(tmp_path / "phone")
    spec = PersonalSpec(epochs=20, lr=1.0, cache_weight=0.3)
    store.refresh(model.plan_dir / "plan.manifest.json", model.checkpoint, windows, spec, version=2)
    app = export_app_model(model.config, model.flat, corpus.vocab, tmp_path / "app2", model_version=2)
    predictor = Predictor()
    predictor.install(app)
    context = [BOS_ID] + corpus.vocab.encode(words[:3])
    assert predictor.suggest_ids(context)[0][0] != corpus.vocab.id(words[3])
    predictor.set_personal(store.load())                         # loaded from disk: what a restart does
    assert predictor.personal_active
    assert predictor.suggest(" ".join(words[:3]))[0][0] == words[3]
    newer = export_app_model(model.config, model.flat, corpus.vocab, tmp_path / "app3", model_version=3)
    predictor.install(newer)                                     # a new global version: not personalized yet
    assert not predictor.personal_active and store.due(3)


def test_the_report_is_counts_and_a_histogram_and_sums_to_the_fairness_figures():
    from contract.model.metrics import Hits

    reports = [PersonalReport(Hits(10, 20, 100), Hits(15, 25, 100), False),
               PersonalReport(Hits(30, 40, 100), Hits(30, 40, 100), True),
               PersonalReport(Hits(50, 60, 100), Hits(40, 60, 100), False)]
    vectors = [r.vector() for r in reports]
    assert all(v.dtype == np.int64 and v.shape == (PersonalReport.size(),) for v in vectors)
    assert all(v[6:6 + BUCKETS].sum() == 1 and v[6 + BUCKETS:6 + 2 * BUCKETS].sum() == 1 for v in vectors)
    total = summarize(np.sum(vectors, axis=0))
    assert total["devices"] == 3 and total["positions"] == 300
    assert total["global"]["top1"] == pytest.approx(0.3) and total["personal"]["top1"] == pytest.approx(85 / 300)
    assert (total["helped"], total["hurt"], total["fell_back"]) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert total["histogram"]["global"][2] == 1 and total["histogram"]["personal"][3] == 1   # 0.10, 0.15
    with pytest.raises(ValueError, match="counts"):
        summarize(np.zeros(3))
    f = fairness([0.1, 0.2, 0.3, 0.4, 0.02])
    assert f["median"] == pytest.approx(0.2) and f["below_half_mean"] == pytest.approx(0.4)
    assert f["p10"] == pytest.approx(np.percentile([0.1, 0.2, 0.3, 0.4, 0.02], 10))


def test_the_split_cache_and_spec_behave():
    w = np.arange(10 * 3).reshape(10, 3)
    first, rest = split(w, 0.8)
    assert len(first) == 8 and len(rest) == 2 and (first[-1] < rest[0]).all()     # typing order
    assert [len(x) for x in split(w[:2], 0.8)] == [1, 1]
    cache = PersonalCache.from_windows(np.array([[BOS_ID, 7, 8, 0], [BOS_ID, 7, 9, 0]]))   # pads ignored
    ids, p = cache.distribution(7, smoothing=2.0)
    probs = dict(zip(ids.tolist(), p))
    assert probs[8] == pytest.approx((1 + 2 * 0.25) / 4) and sum(probs.values()) == pytest.approx(1.0)
    assert PersonalCache.from_json(cache.to_json()).bigrams == cache.bigrams
    for bad in ({"cache_weight": 1.0}, {"epochs": -1}, {"adapt_fraction": 1.0}):
        with pytest.raises(ValueError, match="personalization"):
            PersonalSpec.from_json(bad)
    with pytest.raises(ValueError, match="unknown keys"):
        PersonalSpec.from_json({"lr": 0.1, "layers": "all"})
    assert PersonalSpec.from_json({"epochs": 2.0}).epochs == 2


def test_the_simulation_loop_gives_the_devices_counts_exactly(world):
    from models.personalize import evaluate_users, report

    corpus, model, plan = world
    spec = PersonalSpec(epochs=1, lr=0.2)
    users = {u: corpus.heldout[u] for u in sorted(corpus.heldout)[:4]}
    rows = evaluate_users(plan, model.flat, users, spec, progress=False)
    device_plan = load_plan(model.plan_dir / "plan.manifest.json")   # a phone's own interpreter
    for row in rows:
        on_device = evaluate(device_plan, model.flat, users[row.user], spec)
        assert (row.global_top1, row.personal_top1, row.positions, row.fell_back) == (
            on_device.global_hits.top1, on_device.personal_hits.top1, on_device.global_hits.positions,
            on_device.fell_back)
    r = report(rows)
    assert r["users"] == len(rows) and r["helped"] + r["hurt"] <= 1


def test_the_cache_scores_many_positions_as_the_per_position_mix_does():
    """window_scores ranks the target among the cache's words and the best three outside it; that gives the
    hits and log-likelihood of mixing every position's whole distribution and taking its suggestions."""
    from contract.model.metrics import Hits, suggestions
    from contract.tasks.personal import mix, softmax, window_scores

    rng = np.random.default_rng(0)
    for trial in range(5):
        windows = rng.integers(4, 60, size=(30, 11))
        windows[:, 0] = BOS_ID
        windows[rng.random(windows.shape) < 0.03] = 3                        # oov
        for row, length in zip(windows, rng.integers(2, 11, 30)):
            row[length:] = 0
        logits = rng.normal(size=(30, 10, 300)) * 2
        cache = PersonalCache.from_windows(windows[:15])
        for weight, smoothing in ((0.1, 1.0), (0.5, 0.3), (0.9, 5.0)):
            spec = PersonalSpec(cache_weight=weight, cache_smoothing=smoothing)
            mask = windows[:, 1:] != 0
            probs = np.stack([mix(p, v, cache, spec) for p, v in zip(softmax(logits[mask]), windows[:, :-1][mask])])
            match = suggestions(probs, k=3) == windows[:, 1:][mask][:, None]
            expected = Hits(int(match[:, 0].sum()), int(match.any(axis=1).sum()), int(mask.sum()))
            hits, loglik = window_scores(logits, windows, cache, spec)
            assert hits == expected and 0 < hits.top1 < hits.top3
            assert loglik == pytest.approx(np.log(probs[np.arange(len(probs)), windows[:, 1:][mask]]).sum(), abs=1e-9)


def trained(world) -> np.ndarray:
    """The tiny global model after two epochs over the training users (so that it predicts something)."""
    from contract.model.batching import client_batches

    corpus, model, _ = world
    plan = load_plan(model.plan_dir / "plan.manifest.json")
    plan.set_weights(model.flat)
    for batch in client_batches(np.concatenate(list(corpus.train.values())), 16, 2, 0):
        plan.train_windows(batch, 0.5)
    return plan.get_weights()


def test_the_selection_counts_what_each_phone_would_report(world):
    """models.personal_select scores a grid from shared distributions; each setting's counts are those of
    contract.tasks.personal.evaluate (the phone's evaluation) with that setting."""
    from models.personal_select import Grid, user_results
    from models.personalize import evaluate_users

    corpus, _, plan = world
    flat = trained(world)
    grid = Grid(cache_weights=(0.1, 0.4), smoothings=(1.0,), fallback_nats=(0.0, 5.0), finetune=((0, 0.0), (1, 0.3)))
    specs = sorted(grid.specs(PersonalSpec()), key=lambda s: (s.epochs, s.lr))
    changed = 0
    for user in sorted(corpus.train)[:4]:
        for spec, fast in zip(specs, user_results(plan, flat, user, corpus.train[user], specs)):
            (row,) = evaluate_users(plan, flat, {user: corpus.train[user]}, spec, progress=False)
            assert (fast.global_top1, fast.personal_top1, fast.positions, fast.fell_back) == (
                row.global_top1, row.personal_top1, row.positions, row.fell_back)
            changed += fast.personal_top1 != fast.global_top1
    assert changed > 0


class HeldOut(dict):
    """Held-out users that fail the test if anything reads them."""

    def _read(self, *args, **kwargs):
        raise AssertionError("the selection read the held-out users")

    __getitem__ = __iter__ = __len__ = __contains__ = keys = items = values = get = _read


def test_the_selection_never_reads_the_held_out_users(world):
    import dataclasses

    from benchmarks.personalization import PersonalizationBench, choose_spec
    from models.personal_select import Grid

    corpus, _, plan = world
    flat = trained(world)
    guarded = dataclasses.replace(corpus, heldout=HeldOut(), heldout_texts=HeldOut())
    with pytest.raises(AssertionError, match="held-out"):
        len(guarded.heldout)
    grid = Grid(cache_weights=(0.1, 0.3), smoothings=(1.0,), fallback_nats=(2.0,), finetune=((0, 0.0),), max_hurt=1.0)
    chosen, table = choose_spec(plan, flat, guarded, PersonalizationBench(), grid)
    assert len(table) == 2 and chosen in table
    assert chosen["users"] == sum(len(w) >= 2 for w in corpus.train.values())


def test_the_rule_takes_the_largest_gain_that_hurts_few_and_spares_the_worst_decile():
    from models.personal_select import choose

    def row(gain, micro, hurt, worst):
        return {"relative_gain": gain, "micro_gain": micro, "hurt": hurt,
                "global": {"worst_decile": 0.05}, "personal": {"worst_decile": worst}}

    table = [row(0.09, 0.02, 0.20, 0.06), row(0.07, 0.01, 0.05, 0.04), row(0.05, 0.01, 0.05, 0.06),
             row(0.05, 0.02, 0.08, 0.05), row(0.01, 0.00, 0.00, 0.05)]
    assert choose(table, max_hurt=0.08) is table[3]       # too many hurt; worst decile lower; then micro breaks the tie
    with pytest.raises(ValueError, match="hurts at most"):
        choose(table[:2], max_hurt=0.08)
