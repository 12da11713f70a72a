"""Discovery benchmark: how well federated TrieHH finds the users' new words, at several `min_devices`.

`make bench-discovery` runs the discovery protocol (contract.tasks.discovery, as
the phones and the server run it) in simulation over the 905 training users
of the federated corpus, under the public vocabulary, and writes
`benchmarks/results/discovery.json`:

* for each min_devices: precision and recall of the discovered words
  (the first K, K = the vocabulary's free slots) against the training users'
  true top-K out-of-vocabulary words by number of devices, the rounds
  (levels) and device participations spent, and how many discovered words
  fewer than min_devices devices typed (the protocol promises zero);
* the held-out users' OOV rate under the public vocabulary, after the
  discovered words (at the configured min_devices) fill its free slots, and
  under a vocabulary built from the training users' own text;
* the same protocol in TrieHH's DP regime (one vote per device, devices
  sampled with probability γ < 1/θ per level) and the (ε, δ) it gives.
"""
from __future__ import annotations

import dataclasses
import time

from benchmarks import RESULTS, parse_config, write_result


@dataclasses.dataclass(frozen=True)
class DiscoveryBenchConfig:
    min_devices: str = "5,10,20,40"
    chosen: int = 10               # the min_devices whose words the OOV rate "after" uses
    votes_per_device: int = 100
    passes: int = 2
    max_word_length: int = 12
    dp_min_devices: int = 10
    dp_passes: int = 4
    seed: int = 0


def main() -> int:
    from contract.tasks.discovery import DiscoverySpec
    from models.corpus import load_corpus
    from models.discovery import DiscoveryConfig, device_words, run_discovery, score, true_top
    from models.model import GBOARD
    from models.public_corpus import oov_rate

    cfg, _ = parse_config(DiscoveryBenchConfig, __doc__)
    start = time.monotonic()
    corpus = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len)
    users = load_corpus(vocab_size=GBOARD.vocab_size - 4, seq_len=GBOARD.seq_len, vocabulary="users")
    heldout = [t for ts in corpus.heldout_texts.values() for t in ts]
    words = device_words(corpus.train_texts, corpus.vocab)
    free = len(corpus.vocab.free_slots)
    truth = true_top(words, free, cfg.max_word_length)
    report = {"top_k": free, "devices": len(words), "votes_per_device": cfg.votes_per_device, "passes": cfg.passes,
              "min_devices": [], "precision": [], "recall": [], "found": [], "rounds_each": [],
              "participations_each": [], "revealed_below_threshold": 0}
    chosen = None
    for theta in (int(x) for x in cfg.min_devices.split(",")):
        spec = DiscoverySpec(min_devices=theta, max_word_length=cfg.max_word_length,
                             votes_per_device=cfg.votes_per_device)
        run = run_discovery(words, DiscoveryConfig(spec, 0, cfg.passes, cfg.seed))
        s = score(run["words"], truth, words, theta)
        for key, value in (("min_devices", theta), ("precision", round(s["precision"], 4)),
                           ("recall", round(s["recall"], 4)), ("found", s["found"]),
                           ("rounds_each", run["rounds"]), ("participations_each", run["participations"])):
            report[key].append(value)
        report["revealed_below_threshold"] += s["revealed_below_threshold"]
        print(f"min_devices {theta:>3}: {s['found']:,} words found, precision {s['precision']:.3f}, recall "
              f"{s['recall']:.3f} against the true top {free:,}; {run['rounds']} rounds, {run['participations']:,} "
              f"participations; {s['revealed_below_threshold']} below the threshold", flush=True)
        if theta == cfg.chosen:
            chosen = run
    if chosen is None:
        raise SystemExit(f"error: --chosen {cfg.chosen} is not one of --min-devices {cfg.min_devices}")
    report["rounds"] = max(report["rounds_each"])
    after = corpus.vocab.with_words(chosen["words"][:free])
    report["oov_rate"] = {"public": round(oov_rate(heldout, corpus.vocab), 5),
                          "after_discovery": round(oov_rate(heldout, after), 5),
                          "user_vocab": round(oov_rate(heldout, users.vocab), 5)}
    o = report["oov_rate"]
    report["oov_gap_cut"] = round((o["public"] - o["after_discovery"]) / (o["public"] - o["user_vocab"]), 4)
    report["discovered_sample"] = chosen["words"][:40]
    dp = DiscoverySpec(min_devices=cfg.dp_min_devices, max_word_length=cfg.max_word_length, votes_per_device=1)
    per_level = int(0.9 * len(words) / cfg.dp_min_devices)          # γθ = 0.9 < 1
    dp_run = run_discovery(words, DiscoveryConfig(dp, per_level, cfg.dp_passes, cfg.seed))
    dp_score = score(dp_run["words"], truth, words, cfg.dp_min_devices)
    report["dp"] = {"min_devices": cfg.dp_min_devices, "devices_per_level": per_level, "passes": cfg.dp_passes,
                    **dp_run["privacy"], "found": dp_score["found"], "precision": round(dp_score["precision"], 4),
                    "recall": round(dp_score["recall"], 4), "rounds": dp_run["rounds"]}
    report["revealed_below_threshold"] += dp_score["revealed_below_threshold"]
    report["wall_s"] = round(time.monotonic() - start, 1)
    write_result(RESULTS / "discovery.json", report, show=False)
    d = report["dp"]
    print(f"\nheld-out OOV rate: public vocabulary {o['public']:.2%} → {o['after_discovery']:.2%} with the words "
          f"found at min_devices {cfg.chosen} (user-derived vocabulary: {o['user_vocab']:.2%}; "
          f"{report['oov_gap_cut']:.0%} of the gap closed)")
    print(f"DP regime (1 vote, {d['devices_per_level']} devices per level, {d['passes']} passes): ε = "
          f"{d['epsilon']:.2f}, δ = {d['delta']:.1e}: {d['found']} words, recall {d['recall']:.3f}")
    print(f"first words found: {', '.join(report['discovered_sample'][:20])}")
    print(f"wall {report['wall_s']:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
