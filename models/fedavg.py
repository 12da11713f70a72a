"""Federated averaging in simulation: TFF's client work and server optimizer, the contract's pipeline between.

A round here is the round a deployment runs, stage for stage:

1. TFF's `build_model_delta_client_work` trains every sampled client on its
   windows (client SGD, optionally with each step's gradient clipped, in the
   order `contract.model.batching` defines for the client's seed — the order a
   phone uses) and returns each client's update and example count;
2. each client's update goes through `contract.update.pipeline.UpdatePipeline` —
   the very code a phone encodes with and the server decodes with: weight
   cap, clip, optional rotation, quantization to the spec's bits with the
   client's seed, and the server's exact integer sum and decoding;
3. TFF's `build_apply_optimizer_finalizer` applies the server optimizer
   (`tff.learning.optimizers`, with its learning-rate schedule) to the mean.

Under user-level DP (`dp`) step 2 is TFF's own DP aggregator instead
(`DifferentiallyPrivateFactory.gaussian_adaptive`: adaptive clip, Gaussian
noise, the unweighted mean over the expected cohort), with the parameters a
server round binds (contract.dp.noise; tests/test_dp_parity.py checks the two agree).

Why not a `tff.aggregators` factory around the contract's NumPy code: TFF
0.87 runs computations in its C++ `worker_binary`, which has no PyFunc
kernel, so a `tf.numpy_function` inside an aggregator fails there
("No registered PyFunc"). Returning the clients' results to Python and
aggregating them with the deployment's own code is the closest real thing,
and it makes the simulation and the deployment compute the same thing
from the same updates, bit for bit.
"""
from __future__ import annotations

import collections
import dataclasses
import time

import numpy as np

from contract.model.dropout import Dropout
from contract.update.pipeline import UpdatePipeline, running_sum
from contract.update.robust import zeroing_norm
from contract.update.spec import UpdateSpec, rotation_seed
from models.model import ModelConfig, tff_model_fn, weight_layout


@dataclasses.dataclass
class RoundResult:
    weights: np.ndarray         # the new global weights, flat float32
    train: dict                 # TFF's training metrics, summed over the clients
    clients: int                # updates that went into the mean
    upload_bytes: int           # what the clients' encoded updates weigh in total
    update_norms: list[float]   # each client's update before clipping (L2)
    encode_s: float = 0.0       # time the clients' encoding took in total (what a phone spends)
    dp_clip: float | None = None  # under DP: the adaptive clip after this round
    zeroed: int = 0             # updates counted but not added (spec.zeroing: norm far above the last median)


class DPAggregator:
    """TFF's `gaussian_adaptive` aggregator for a simulated cohort of `clients` per round.

    `deploy_reports` (a projection): add the noise a deployment with that many reports per round
    would add to its mean (std z_v·C/m_deploy), while averaging this simulation's smaller
    cohort; the clip estimate's noise is scaled the same way.
    """

    def __init__(self, spec, clients: int, size: int, deploy_reports: int | None = None):
        import tensorflow_federated as tff

        self.spec = spec.validate("--dp")
        scale = clients / deploy_reports if deploy_reports else 1.0
        _, count_stddev = spec.split(deploy_reports or clients)
        self.noise_multiplier = spec.noise_multiplier * scale
        factory = tff.aggregators.DifferentiallyPrivateFactory.gaussian_adaptive(
            noise_multiplier=self.noise_multiplier, clients_per_round=float(clients),
            initial_l2_norm_clip=spec.initial_clip, target_unclipped_quantile=spec.target_quantile,
            learning_rate=spec.clip_learning_rate, clipped_count_stddev=count_stddev * scale)
        self.process = factory.create(tff.TensorType(np.float32, [size]))
        self.state = self.process.initialize()

    def mean(self, deltas: list[np.ndarray], round_num: int = 0) -> tuple[np.ndarray, float]:
        """The noised mean of the clipped `deltas`, and the clip after this round."""
        out = self.process.next(self.state, [np.asarray(d, np.float32) for d in deltas])
        self.state = out.state
        return np.asarray(out.result, np.float32), float(out.measurements["dp_query_metrics"]["clip"])


class DistributedDPAggregator:
    """Distributed DP as phones and server run it: the contract's pipeline under secure aggregation
    (8-bit grid, each client's discrete Gaussian share, the unclipped bit) with the masks left out
    (they cancel in the sum), and contract.dp.noise's adaptive clip on the noised count.

    `deploy_reports` is a projection as in `DPAggregator`: the shares add up to the noise a
    deployment of that many reports would put on its mean.
    """

    def __init__(self, spec, clients: int, size: int, layout_sha256: str, seed: int,
                 deploy_reports: int | None = None, bits: int = 8):
        self.spec, self.clients, self.size, self.layout_sha256, self.seed = spec.validate("--dp"), clients, size, \
            layout_sha256, seed
        self.scale = clients / deploy_reports if deploy_reports else 1.0
        self.expected = deploy_reports or clients
        self.bits = bits
        self.clip = spec.initial_clip
        self.noise_multiplier = spec.noise_multiplier * self.scale

    def round_spec(self, round_num: int):
        zv, sb = self.spec.split(self.expected)
        update = UpdateSpec(bits=self.bits, rotation=True, clip_norm=self.clip, weighting="uniform",
                            secure_aggregation=True)
        return update.bind(self.size, self.layout_sha256, f"simulation/{round_num}", rotation_seed(self.seed, round_num),
                           self.clients, ("distributed", zv * self.clip * self.scale, self.clients, sb * self.scale))

    def mean(self, deltas: list[np.ndarray], round_num: int = 0) -> tuple[np.ndarray, float]:
        from contract.dp.noise import adapt_clip

        pipeline = UpdatePipeline(self.round_spec(round_num))
        total = np.zeros(pipeline.vector_size, np.int64)
        for i, delta in enumerate(deltas):
            pipeline.fold(total, pipeline.plaintext(delta, 1, seed=(round_num << 20) + i).astype(np.int64))
        mean, unclipped = pipeline.finalize_masked_with_count(total, len(deltas))
        self.clip = adapt_clip(self.clip, unclipped, len(deltas), self.clients, self.spec, noised=True)
        return mean, self.clip


class FederatedAveraging:
    """One simulated population: `next(weights, datasets, seeds, round_num)` runs one round."""

    def __init__(self, model_config: ModelConfig, client_optimizer, server_optimizer,
                 spec: UpdateSpec, seed: int = 0, dp: "DPAggregator | DistributedDPAggregator | None" = None,
                 dropout: Dropout | None = None):
        """`dropout`: the clients train with it, their datasets carrying the masks
        (models.simulate.client_dataset)."""
        import tensorflow_federated as tff

        self.config, self.spec, self.seed, self.dp = model_config, spec.validate(), seed, dp
        if dp is not None and spec.zeroing:
            raise ValueError("zeroing draws its threshold from other devices' norms, which DP's accounting "
                             "does not cover: use one or the other")
        self._accepted_norms: list[float] = []     # the last round's, for zeroing's median
        self.layout = weight_layout(model_config)
        model_fn = tff_model_fn(model_config, dropout)
        self.client_work = tff.learning.templates.build_model_delta_client_work(
            model_fn, client_optimizer, tff.learning.ClientWeighting.NUM_EXAMPLES,
            loop_implementation=tff.learning.LoopImplementation.DATASET_ITERATOR)
        weights_type = self.client_work.next.type_signature.parameter[1].member
        self.finalizer = tff.learning.templates.build_apply_optimizer_finalizer(
            server_optimizer, weights_type)
        client_work = self.client_work

        @tff.federated_computation(client_work.initialize.type_signature.result,
                                   tff.FederatedType(weights_type, tff.SERVER),
                                   client_work.next.type_signature.parameter[2])
        def train_clients(state, weights, data):
            out = client_work.next(state, tff.federated_broadcast(weights), data)
            return out.result, out.measurements

        self._train_clients = train_clients
        self._weights_type = weights_type
        self.client_state = client_work.initialize()
        self.server_state = self.finalizer.initialize()

    def _model_weights(self, flat: np.ndarray):
        import tensorflow_federated as tff

        return tff.learning.models.ModelWeights(
            list(self.layout.unflatten(np.asarray(flat, np.float32)).values()), [])

    def next(self, flat: np.ndarray, datasets: list, seeds: list[int], round_num: int,
             tamper=None) -> RoundResult:
        """One round from global weights `flat` over the clients' datasets (one seed each).

        `tamper(deltas)`, if given, is what the clients upload instead of their trained deltas
        (models.attacks); it still goes through the round's pipeline, as any upload does."""
        results, measurements = self._train_clients(self.client_state, self._model_weights(flat), datasets)
        # TFF's update is initial − trained (a pseudo-gradient); a phone uploads trained − initial.
        deltas = [-self.layout.flatten(list(r.update)) for r in results]
        if tamper is not None:
            deltas = tamper(deltas)
        if self.dp is not None:
            return self._next_dp(flat, deltas, measurements, round_num)
        limit = zeroing_norm(self.spec.zeroing, self._accepted_norms)
        pipeline = UpdatePipeline(self.spec.bind(self.layout.size, self.layout.sha256,
                                                 f"simulation/{round_num}",
                                                 rotation_seed(self.seed, round_num), zeroing_norm=limit))
        total, uploaded, norms, encode_s, accepted, zeroed = running_sum(pipeline), 0, [], 0.0, [], 0
        for result, delta, seed in zip(results, deltas, seeds):
            weight = int(round(float(result.update_weight)))
            if weight < 1 or not np.isfinite(delta).all():
                continue    # TFF gives a non-finite update weight 0; a phone would not upload it
            norms.append(float(np.linalg.norm(delta)))
            t0 = time.perf_counter()
            encoded = pipeline.encode(delta, weight, seed)
            encode_s += time.perf_counter() - t0
            uploaded += len(encoded.body)
            contribution = pipeline.accept(encoded.body, encoded.weight)
            accepted.append(contribution.norm)      # what the server reads, as server.rounds keeps it
            if contribution.zeroed:
                zeroed += 1
            else:
                total.add(contribution)
        self._accepted_norms = accepted
        if total.updates == 0:
            return RoundResult(np.asarray(flat, np.float32), {}, 0, uploaded, norms, encode_s, zeroed=zeroed)
        mean_delta = pipeline.finalize(total.total, total.weight)
        return self._apply(flat, mean_delta, measurements,
                           RoundResult(flat, {}, total.updates, uploaded, norms, encode_s, zeroed=zeroed))

    def _next_dp(self, flat: np.ndarray, deltas: list[np.ndarray], measurements, round_num: int) -> RoundResult:
        deltas = [d for d in deltas if np.isfinite(d).all()]
        norms = [float(np.linalg.norm(d)) for d in deltas]
        mean_delta, clip = self.dp.mean(deltas, round_num)
        return self._apply(flat, mean_delta, measurements, RoundResult(
            flat, {}, len(deltas), 4 * self.layout.size * len(deltas), norms, 0.0, clip))

    def _apply(self, flat: np.ndarray, mean_delta: np.ndarray, measurements, result: RoundResult) -> RoundResult:
        gradient = self._model_weights(-mean_delta).trainable
        out = self.finalizer.next(self.server_state, self._model_weights(flat), gradient)
        self.server_state = out.state
        return dataclasses.replace(result, weights=self.layout.flatten(list(out.result.trainable)),
                                   train={k: float(v) for k, v in measurements["train"].items()})


def client_optimizer(learning_rate: float, clip_norm: float | None):
    """Client SGD, with each step's gradient clipped to `clip_norm` (global L2) when given."""
    import tensorflow_federated as tff

    if clip_norm is None:
        return tff.learning.optimizers.build_sgdm(learning_rate=learning_rate)
    return build_clipped_sgd(learning_rate, clip_norm)


def build_clipped_sgd(learning_rate: float, clip_norm: float):
    """A `tff.learning` optimizer: w -= lr * clip_by_global_norm(g, clip_norm).

    Plain SGD on a client that trains dozens of local steps on one speaker's
    text can blow up; bounding each step's norm keeps a high learning rate
    usable. The training plan applies the same `tf.clip_by_global_norm`.
    """
    import tensorflow as tf
    import tensorflow_federated as tff

    class ClippedSGD(tff.learning.optimizers.Optimizer):
        def initialize(self, specs):
            return collections.OrderedDict(learning_rate=learning_rate)

        def next(self, state, weights, gradients):
            clipped, _ = tf.clip_by_global_norm(tf.nest.flatten(gradients), clip_norm)
            updated = [w - tf.cast(state["learning_rate"], w.dtype) * g
                       for w, g in zip(tf.nest.flatten(weights), clipped)]
            return state, tf.nest.pack_sequence_as(weights, updated)

        def get_hparams(self, state):
            return collections.OrderedDict(learning_rate=state["learning_rate"])

        def set_hparams(self, state, hparams):
            return collections.OrderedDict(learning_rate=hparams["learning_rate"])

    return ClippedSGD()
