"""Penultimate-layer embeddings from the exported ONNX model, with ONNX Runtime (no torch).

The exported graph ends in the classifier's Gemm (or MatMul + Add). Its input tensor, the pooled
feature vector, is added as a second graph output; the rewritten graph is cached under
.cache/embeddings/ keyed by the model file's hash, so every later run loads it directly.
One session run then gives logits and embeddings together.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from lensmith.fsutil import file_sha256, write_bytes_atomic
from lensmith.onnxmodel import CPU, OnnxModel, OnnxModelError, ProviderPolicy, requested_providers, runs_on_gpu, softmax, usable_providers
from lensmith.preprocess import Preprocessing
from lensmith.procutil import available_cores

EMBEDDING_OUTPUT = "lensmith_embedding"
GPU_MIN_BATCH = 256  # images per run on a GPU provider: small batches leave it waiting on each launch


@dataclass(frozen=True)
class Outputs:
    """What one pass over a batch of images yields."""

    embeddings: np.ndarray  # N x D float32
    probabilities: np.ndarray  # N x classes float64


def classifier_input_name(model: "onnx.ModelProto") -> str:  # type: ignore[name-defined]  # noqa: F821
    """Name of the tensor feeding the last classifier layer (Gemm, or MatMul before a bias Add)."""
    producers = {out: node for node in model.graph.node for out in node.output}
    node = producers.get(model.graph.output[0].name)
    for _ in range(4):  # a few pass-through nodes (Identity, bias Add) may sit after the matmul
        if node is None:
            break
        if node.op_type in ("Gemm", "MatMul"):
            return node.input[0]
        if node.op_type in ("Add", "Identity", "Cast"):
            node = next((producers[i] for i in node.input if i in producers), None)
            continue
        break
    raise OnnxModelError(
        "cannot find the classifier layer (Gemm/MatMul) at the end of the ONNX graph; "
        "drift embeddings need a model exported by `lensmith export`"
    )


def with_embedding_output(model_path: Path) -> bytes:
    """The model with the classifier's input exposed as the extra output `lensmith_embedding`."""
    import onnx

    model = onnx.load(str(model_path))
    source = classifier_input_name(model)
    identity = onnx.helper.make_node("Identity", [source], [EMBEDDING_OUTPUT], name="lensmith_embedding_tap")
    model.graph.node.append(identity)
    model.graph.output.append(onnx.helper.make_tensor_value_info(EMBEDDING_OUTPUT, onnx.TensorProto.FLOAT, None))
    return model.SerializeToString()


def embedding_model_path(model_path: Path, cache_dir: Path) -> Path:
    """The cached embedding graph for `model_path`, written on first use."""
    if not Path(model_path).is_file():
        raise OnnxModelError(f"no ONNX model at {model_path}; run `lensmith export` first")
    target = Path(cache_dir) / "embeddings" / f"{file_sha256(model_path)[:24]}.onnx"
    if not target.is_file():
        write_bytes_atomic(target, with_embedding_output(model_path))
    return target


class EmbeddingModel:
    """An ONNX Runtime session giving probabilities and penultimate embeddings in one run.

    `providers`: "auto" or a preference list (drift.providers; see lensmith.onnxmodel.requested_providers), in full
    float32 on CUDA. On the CPU, threads=0: one single-threaded run per usable core, side by side (a session may be
    run from several threads at once). On small CPUs that beats one multi-threaded run, which waits at every operator
    for its slowest thread (the depthwise convolutions of mobile backbones barely scale past one thread). On a GPU
    provider: one run at a time, of at least GPU_MIN_BATCH images."""

    def __init__(self, model_path: Path, cache_dir: Path, threads: int = 0, providers: ProviderPolicy = (CPU,)) -> None:
        chosen = usable_providers(requested_providers(providers))
        # the rewritten graph keeps the metadata_props: classes, preprocessing and version come with it
        graph = embedding_model_path(model_path, cache_dir)
        self.onnx = OnnxModel.load(graph, chosen, threads=threads if runs_on_gpu(chosen) or threads else 1, exact=True)
        if runs_on_gpu(chosen) and not self.on_gpu:  # the GPU provider could not start: the CPU layout after all
            self.onnx = OnnxModel.load(graph, [CPU], threads=threads or 1)
        self.parallel_runs = available_cores() if threads == 0 and not self.on_gpu else 1
        self.model_path = Path(model_path)
        self.classes: list[str] = self.onnx.classes
        self.preprocessing: Preprocessing = self.onnx.preprocessing
        self.version: str = self.onnx.version
        self.session: ort.InferenceSession = self.onnx.session
        self.input_name = self.onnx.input_name
        self.output_names = [self.session.get_outputs()[0].name, EMBEDDING_OUTPUT]

    @property
    def provider(self) -> str:
        """The provider that runs the embeddings (recorded in the drift reference and report)."""
        return self.onnx.provider

    @property
    def on_gpu(self) -> bool:
        return runs_on_gpu([self.onnx.provider])

    def run_uint8(self, batch_nchw_uint8: np.ndarray) -> Outputs:
        """N x C x H x W uint8 at the model's input size -> probabilities and embeddings."""
        x = self.preprocessing.normalize(np.asarray(batch_nchw_uint8))
        logits, embedding = self.session.run(self.output_names, {self.input_name: x})
        return Outputs(embeddings=embedding.reshape(len(x), -1).astype(np.float32), probabilities=softmax(logits))

    def run_all(self, images_nchw_uint8: np.ndarray, batch_size: int) -> Outputs:
        """Every image in batches (run side by side on the CPU, in turn on a GPU; results in order); an empty input
        gives empty arrays."""
        slices = list(batch_slices(len(images_nchw_uint8), max(batch_size, GPU_MIN_BATCH) if self.on_gpu else batch_size))
        if self.parallel_runs > 1 and len(slices) > 1:
            with ThreadPoolExecutor(self.parallel_runs, thread_name_prefix="embed") as pool:
                parts = list(pool.map(lambda s: self.run_uint8(images_nchw_uint8[s]), slices))
        else:
            parts = [self.run_uint8(images_nchw_uint8[s]) for s in slices]
        if not parts:
            return Outputs(np.zeros((0, 0), np.float32), np.zeros((0, len(self.classes))))
        return Outputs(
            embeddings=np.concatenate([p.embeddings for p in parts]),
            probabilities=np.concatenate([p.probabilities for p in parts]),
        )


def batch_slices(n: int, size: int) -> Iterator[slice]:
    for start in range(0, n, size):
        yield slice(start, min(start + size, n))


# ---- PCA (fitted with scikit-learn at reference time, applied with numpy at monitoring time) ----------


@dataclass(frozen=True)
class Projection:
    mean: np.ndarray  # D
    components: np.ndarray  # K x D
    explained_variance_ratio: np.ndarray  # K

    def transform(self, embeddings: np.ndarray) -> np.ndarray:
        return (np.asarray(embeddings, dtype=np.float64) - self.mean) @ self.components.T

    def to_dict(self) -> dict[str, list]:
        return {
            "mean": self.mean.tolist(),
            "components": self.components.tolist(),
            "explained_variance_ratio": self.explained_variance_ratio.tolist(),
        }

    @classmethod
    def from_dict(cls, d: dict[str, list]) -> Projection:
        return cls(
            mean=np.asarray(d["mean"], dtype=np.float64),
            components=np.asarray(d["components"], dtype=np.float64),
            explained_variance_ratio=np.asarray(d["explained_variance_ratio"], dtype=np.float64),
        )


def fit_projection(embeddings: np.ndarray, dims: int, seed: int = 0) -> Projection:
    """PCA with at most `dims` components (fewer when there are fewer images or features)."""
    from sklearn.decomposition import PCA

    k = max(1, min(dims, embeddings.shape[0] - 1, embeddings.shape[1]))
    pca = PCA(n_components=k, random_state=seed).fit(np.asarray(embeddings, dtype=np.float64))
    return Projection(pca.mean_, pca.components_, pca.explained_variance_ratio_)


def component_columns(k: int) -> list[str]:
    return [f"emb_pc{i + 1:02d}" for i in range(k)]
