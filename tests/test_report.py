"""benchmarks/report.py: REPORT.md and the README's table from whatever results exist."""
from __future__ import annotations

import copy
import dataclasses
import json

from benchmarks.report import headline, machine, render, update_readme

FLEET = {"max_phones": 10000, "phones_per_round": 988.1, "wall_s_per_round": 22.3,
         "rounds_per_simulated_night": 28.9, "clock_speed": 40.0}
DEMO = {"wall_s": 300.0, "rounds": 30, "published_versions": 4, "phones": 240,
        "initial": {"top1": 0.0001, "top3": 0.0001, "loss": 9.21},
        "final": {"top1": 0.0964, "top3": 0.1521, "loss": 6.63}}


def test_the_report_describes_the_machine_and_every_result(tmp_path):
    (tmp_path / "fleet.json").write_text(json.dumps(FLEET))
    (tmp_path / "demo.json").write_text(json.dumps(DEMO))
    (tmp_path / "extra.json").write_text(json.dumps({"x": 1}))
    results = {p.stem: json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    text = render(results, tmp_path)
    m = machine()
    assert m["cores"] and m["packages"]["tensorflow-federated"] in text
    assert "10,000 phones" in text and "28.9" in text and "9.64%" in text
    assert "Not yet measured: run `make bench-quality`" in text   # missing results say how to get them
    assert '"x": 1' in text                                        # unknown files are kept, raw


def test_the_readme_block_is_replaced_between_its_markers(tmp_path):
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:begin -->\nold\n<!-- bench:end -->\nrest\n")
    assert update_readme(headline({"fleet": FLEET, "demo": DEMO}), readme)
    text = readme.read_text()
    assert "old" not in text and text.startswith("intro\n") and text.endswith("rest\n")
    assert "| fleet | 10,000 phones, 988 per round" in text and "loss 9.21 → 6.63" in text


def test_the_quality_table_states_the_margin_over_the_ngram_in_positions():
    from benchmarks.quality import QualityConfig, table

    report = {"config": vars(QualityConfig()), "heldout_clients": 226, "heldout_positions": 200_000,
              "wall_s": 2340.0,
              "results": {"ngram": {"top1": 0.1557, "top3": 0.2647},
                          "central": {"top1": 0.1583, "top3": 0.2676},
                          "federated": {"top1": 0.1560, "top3": 0.2628}}}
    text = table(report)
    assert ("| CIFG, federated from random weights (600 rounds × 10 clients, FedSgdm), users' vocabulary "
            "| 15.60% | 26.28% |") in text
    assert "0.03 points above the users'-vocabulary n-gram's (60 held-out positions). The margin is thin" in text
    behind = copy.deepcopy(report)
    behind["results"]["federated"]["top1"] = 0.1545
    assert "0.12 points below the users'-vocabulary n-gram's (240 held-out positions): it does not yet" in table(behind)
    ahead = copy.deepcopy(report)
    ahead["results"]["federated"]["top1"] = 0.1657
    assert "1.00 points above the users'-vocabulary n-gram's (2,000 held-out positions).\n" in table(ahead)
    # with the public-pretrained rows, the verdict is the better of the two without user text
    public = copy.deepcopy(report)
    public["results"].update(federated_pretrained={"top1": 0.1700, "top3": 0.28},
                             federated_pretrained_discovery={"top1": 0.1750, "top3": 0.29},
                             oov_rate={"public": 0.1362, "after_discovery": 0.0741, "users": 0.0371})
    text = table(public)
    assert "| CIFG, federated from pretrained + discovered words | 17.50% | 29.00% |" in text
    # a row that ran another setting is named with its own
    public["results"]["federated"]["config"] = {"server_optimizer": "adam", "server_lr": 0.03, "rounds": 600}
    assert "(600 rounds × 10 clients, FedAdam), users' vocabulary | 15.60% | 26.28% | 600 rounds, server adam 0.03 |" \
        in table(public)
    assert "CIFG, federated from pretrained + discovered words: top-1 1.93 points above" in text
    assert "13.62% under the public vocabulary, 7.41% with the discovered words, 3.71% under the users'" in text
    assert "thin" not in table(ahead)
    # the shipped rows: each against its target, the goals, the predictor's parts and its setting
    shipped = copy.deepcopy(public)
    shipped["results"].update(
        central_dropout={"top1": 0.1653, "top3": 0.28, "config": {"epochs": 8, "dropout": 0.3}},
        federated_pretrained_dropout={"top1": 0.1690, "top3": 0.29, "config": {
            "dropout": 0.3, "rounds": 600, "server_optimizer": "sgdm", "server_lr": 1.0}},
        shipped_predictor={"top1": 0.1712, "top3": 0.30, "combines": "app model + typing cache",
                           "app_model_alone": {"top1": 0.1688},
                           "config": {"cache_weight": 0.1, "cache_smoothing": 1.0, "ngram_weight": 0.0}})
    text = table(shipped)
    assert "| **Shipped predictor: app model + typing cache** | 17.12% | 30.00% | λ cache 0.1, κ 1.0" in text
    assert "| 600 rounds, server sgdm 1.0, dropout 0.3 |" in text
    assert "Target for the federated pretrained dropout (top-1 ≥ 16.8%): met (16.90%)." in text
    assert "Target for the shipped predictor (top-1 ≥ 17.0%): met (17.12%)." in text
    assert "shipped predictor ≥ 17.6%: not met; the network alone (16.90%) at or above central with dropout " \
           "(16.53%): met." in text


def test_quality_rows_run_side_by_side_merge_and_old_rows_keep_the_setting_they_ran_with():
    from benchmarks.quality import QualityConfig, merge

    cfg = QualityConfig(rows="federated_pretrained")
    old_config = {k: v for k, v in vars(QualityConfig()).items() if k not in ("rows", "discovery_votes")}
    earlier = {"config": old_config,   # written before discovery_votes existed: its default counts as equal
               "results": {"ngram": {"top1": 0.1557}, "federated_pretrained": {"top1": 0.10},
                           "oov_rate": {"users": 0.037}},
               "timings": {"ngram_s": 8.0, "federated_pretrained_s": 99.0}}
    mine = {"config": vars(cfg), "results": {"federated_pretrained": {"top1": 0.16}, "oov_rate": {"public": 0.136}},
            "timings": {"federated_pretrained_s": 2000.0}, "reused": [], "wall_s": 2000.0}
    merged = merge(mine, earlier, cfg)
    assert merged["results"]["ngram"] == {"top1": 0.1557, "config": old_config}   # kept, with its setting
    assert merged["results"]["federated_pretrained"] == {"top1": 0.16}       # this run's figure wins
    assert merged["results"]["oov_rate"] == {"users": 0.037, "public": 0.136}
    assert merged["reused"] == ["ngram"] and merged["wall_s"] == 2008.0
    # a row of another setting stays, named with its own setting; a row that carries one keeps it
    changed = merge(mine, {**earlier, "config": {**old_config, "rounds": 10},
                           "results": {**earlier["results"], "central_dropout": {"top1": 0.165, "config": {"epochs": 8}}}},
                    cfg)
    assert changed["results"]["ngram"]["config"]["rounds"] == 10
    assert changed["results"]["central_dropout"]["config"] == {"epochs": 8}
    assert changed["reused"] == ["central_dropout", "ngram"]
    assert merge(mine, None, cfg) is mine


def test_the_dp_section_lists_every_row_against_the_non_private_run():
    from benchmarks.report import dp

    report = {"baseline": {"top1": 0.15, "top3": 0.26},
              "rows": [{"mechanism": "central", "noise_multiplier": 1.0, "population": 1_000_000,
                        "reports_per_round": 6500, "rounds": 100, "epsilon": 0.81, "delta": 2.5e-7,
                        "accountant": "pld", "top1": 0.147, "top3": 0.255, "projection": True},
                       {"mechanism": "central", "noise_multiplier": 1.0, "population": 905,
                        "reports_per_round": 10, "rounds": 100, "epsilon": 4.2, "delta": 5.6e-4,
                        "accountant": "pld", "top1": 0.02, "top3": 0.05, "projection": False}],
              "targets": {"met": True, "goal_met": False}}
    text = dp(report)
    assert "| central | 1 | projection: N = 1,000,000, m = 6,500 | 0.81 (pld, δ = 2.5e-07) | 14.70% / 25.50% | -2.0% |" in text
    assert "this population: N = 905, m = 10" in text and "-86.7%" in text
    assert "met; goal (ε ≤ 1 within 2%): not met" in text


def test_dp_rows_of_an_earlier_run_are_kept_only_when_its_setting_matches():
    from benchmarks.dp import DPBenchConfig, reusable, rows_of, row_name

    cfg = DPBenchConfig(noise_multipliers="1.0", mechanisms="central", deployments="gboard")
    rows = [{**r, "population": r["population"] or 905, "top1": 0.1} for r in rows_of(cfg)]
    earlier = {"config": dataclasses.asdict(cfg), "baseline": {"top1": 0.15, "top3": 0.25}, "rows": rows}
    wider = DPBenchConfig(noise_multipliers="0.7,1.0", mechanisms="central,distributed", deployments="gboard")
    kept = reusable(wider, earlier)
    assert set(kept) == {"baseline", "central_z1_N1000000_m6500", "central_z1_honest"}
    assert {row_name(r) for r in rows_of(wider)} > set(kept) - {"baseline"}
    assert reusable(dataclasses.replace(wider, rounds=7), earlier) == {}
    assert reusable(wider, None) == {}


def test_dp_ftrl_rows_match_dp_fedavgs_epsilon_and_sit_beside_it():
    """benchmarks.dp.compare with the simulation stubbed: the DP-FedAvg row reuses the central run of the same
    z and is accounted at δ = 1e-10; the DP-FTRL row's noise gives at most that ε under b = ⌊N/m⌋, k = ⌈n/b⌉."""
    from benchmarks.dp import DPBenchConfig, compare, report_of
    from benchmarks.dp_ftrl import table
    from benchmarks.quality import FederatedConfig
    from models.dp_ftrl import privacy_spent

    cfg = DPBenchConfig(deployments="gboard", ftrl_match_z="1.0")
    central = {"mechanism": "central", "noise_multiplier": 1.0, "population": 1_000_000, "reports_per_round": 6500,
               "projection": True, "top1": 0.149, "top3": 0.25, "epsilon": 0.77, "delta": 2.5e-7}
    ran = []

    def simulate(sim, name):
        ran.append((name, sim))
        return {"dp": privacy_spent(sim, 905, sim.rounds), "final": {"top1": 0.144, "top3": 0.249}}

    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k in dataclasses.asdict(FederatedConfig())}
    rows = compare(cfg, FederatedConfig(**fields), [central], {}, simulate, lambda done: None)
    fedavg, ftrl = rows
    assert [name for name, _ in ran] == ["ftrl_at-central-z1_N1000000_m6500_delta1e-10"]
    assert (fedavg["assumption"], fedavg["delta"], fedavg["top1"]) == ("poisson", 1e-10, 0.149)
    assert 1.6 < fedavg["epsilon"] < 1.8                             # z = 1, q = 0.0065, 100 rounds at δ = 1e-10
    assert (ftrl["assumption"], ftrl["b"], ftrl["k"]) == ("participation", 153, 1)
    assert fedavg["epsilon"] * 0.999 < ftrl["epsilon"] <= fedavg["epsilon"]
    assert ran[0][1].dp.mechanism == "ftrl" and ran[0][1].dp_deploy_reports == 6500
    report = report_of(cfg, {"top1": 0.15, "top3": 0.26}, [central], rows)
    assert report["ftrl_targets"]["met"] and not report["ftrl_targets"]["goal_met"]      # −4%: within 5%, not 3%
    text = table(report)
    assert "| N = 1,000,000, m = 6,500 | 1.69 | 1 | 14.90% / 25.00% (-0.7%) | " in text
    assert "b = 153, k = 1" in text and "14.40% / 24.90% (-4.0%)" in text


def test_the_attack_table_judges_the_all_defences_runs_at_ten_percent():
    from benchmarks.report import attacks

    run = {"attack": "model_replacement", "attacker_fraction": 0.1, "defences": ["clip", "dp"],
           "top1": 0.148, "backdoor_success": 0.0}
    config = {"server_optimizer": "sgd", "server_lr": 1.0, "rounds": 20}
    ok = attacks({"config": config, "clean": {"top1": 0.15}, "runs": [run]})
    assert "| model_replacement | 10% | clip + dp | 14.80% | -0.20 | 0% |" in ok and ok.endswith("met.")
    assert "sgd at 1" in ok
    bad = attacks({"config": config, "clean": {"top1": 0.15}, "runs": [{**run, "backdoor_success": 0.2}]})
    assert bad.endswith("not met.")
    fleet = {"attackers": 24, "phones": 240, "rounds": 30, "final_version": 30, "top1": 0.134, "backdoor_success": 0.0,
             "by_version": [{"backdoor_success": 0.0}, {"backdoor_success": 0.05}], "uploads_accepted": 600,
             "attacker_uploads_accepted": 55}
    both = attacks({"config": config, "clean": {"top1": 0.15}, "runs": [run],
                    "fleet": {"all": fleet, "clean_demo_top1": 0.135},
                    "adaptive_server": {"config": {**config, "server_optimizer": "adam", "server_lr": 0.03},
                                        "clean": {"top1": 0.14}, "runs": [{**run, "backdoor_success": 1.0}]}})
    assert "24 of 240 phones" in both and "backdoor success 0% (at most 5% in any evaluated version)" in both
    assert "55 of 600 accepted uploads" in both and "(the demo's clean run 13.50%)" in both
    assert "Adam at 0.03" in both and both.endswith("not met.")


def test_the_personalization_section_judges_gain_worst_decile_and_hurt():
    from benchmarks.report import personalization

    dist = {"top1": 0.15, "micro_top1": 0.14, "median": 0.14, "p10": 0.08, "worst_decile": 0.06,
            "below_half_mean": 0.05}
    mine = {"top1": 0.165, "micro_top1": 0.145, "median": 0.16, "p10": 0.09, "worst_decile": 0.07,
            "below_half_mean": 0.03}
    spec = {"epochs": 0, "lr": 0.0, "cache_weight": 0.2, "cache_smoothing": 2.0, "fallback_nats": 2.0}
    chosen = {"spec": spec, "users": 905, "relative_gain": 0.06, "micro_gain": 0.02, "hurt": 0.07, "fell_back": 0.4}
    r = {"selection": "training users", "users": 226, "positions": 39671, "global_model": "m", "global": dist,
         "personal": mine, "relative_gain": 0.10, "micro_gain": 0.036, "helped": 0.6, "hurt": 0.05, "fell_back": 0.1,
         "spec": spec, "personal_layers": ["output_bias"],
         "meets_targets": {"relative_gain": True, "hurt": True, "worst_decile": True},
         "training_users": {"chosen": chosen, "best_of_each_family": {"cache only": chosen}, "settings_tried": 270},
         "median_user_windows": 40, "finetune_s_median_user": 0.5, "suggest_ms_p50": 1.2, "suggest_ms_p99": 3.0,
         "in_sample_previous": {"relative_gain": 0.048}}
    text = personalization(r)
    assert "| personal (after fallback) | 16.50% | 14.50% | 16.00% | 9.00% | 7.00% | 3.0% |" in text
    assert "chosen on the 905 training users only, measured once on 226 held-out users" in text
    assert "per-user mean +10.0%, micro-averaged +3.6%" in text and "+4.8%" in text and "in-sample" in text
    assert "| cache only | 0.2 / 2.0 / 2.0 / 0×0.0 | +6.0% | +2.0% | 7% | 40% |" in text
    assert "worst decile not below the global model's): met; goal (gain ≥ 10%): met" in text
    worse = {**r, "meets_targets": {**r["meets_targets"], "worst_decile": False}, "relative_gain": 0.04}
    assert "not met (worst_decile); goal (gain ≥ 10%): not met" in personalization(worse)


def test_the_export_section_says_where_the_bytes_go_and_judges_size_and_agreement():
    from benchmarks.report import export

    judged = {"federated": {"top1_agreement": 0.994, "positions": 2772, "float": {"top1": 0.15, "top3": 0.26},
                            "quantized": {"top1": 0.15, "top3": 0.26},
                            "precision_variants": {"shipped": {"top1_agreement": 0.994, "stored_bytes": 1228060}}}}
    r = {"plan_bytes": 6_000_000, "plan_to_float_weights": 1.05, "app_model_bytes": 1_244_320,
         "app_model_bytes_by_weight": {"embedding_8bit": 480_204, "graph and the rest": 16_260},
         "train_step_ms_median": 80.0, "suggest_ms_p50": 0.8, "suggest_ms_p99": 2.0, "threads": 1,
         "judged": judged, "targets": {"app_model_bytes_max": 1_400_000, "top1_agreement_min": 0.98},
         "meets_targets": {"app_model_bytes": True, "top1_agreement_trained": True}}
    text = export(r)
    assert "1,244,320 B — embedding_8bit 480,204, graph and the rest 16,260" in text
    assert "| shipped | 99.40% | 1,228,060 |" in text and text.endswith("trained weights): met.")
    assert export({**r, "meets_targets": {"app_model_bytes": False, "top1_agreement_trained": True}}).endswith("not met.")


