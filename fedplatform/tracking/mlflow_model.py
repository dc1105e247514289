"""The trained model as an MLflow pyfunc model, defined from code (`mlflow_model_code.py`), not pickled.

`mlflow.pyfunc.load_model("runs:/<id>/model").predict(images)` takes uint8 images [N, H, W, C] as the
prepared store keeps them (H, W, C = `input_shape` of `fedplatform_model.json`; encoded stores such
as ImageNet-LT or PACS: RGB images already resized to S·256/224 and centre-cropped to S x S, the
evaluation view) and returns float32 class probabilities [N, C]: normalisation with the dataset's
mean/std, the student network, and the head the algorithm evaluates `accuracy` with (its own
classifier, or CReFF/CLIP2FL's re-trained one). The model's artifacts are the weights
(`model.safetensors`, only the entries prediction needs) and that JSON spec.

FedCLIP (head "clip_adapter"): the weights are the adapter alone; the frozen CLIP is named in the
spec (`clip`: model, hub tag or checkpoint path, weights identity) and loaded again through
`models.clip.create_clip` (failing in one line when this machine cannot get those weights); its
eval preprocessing, image encoder, the adapter, and the cosine with the class prompts, times CLIP's
logit scale, give the logits. Input: the store's pixels, or for encoded stores the CLIP's own view.
"""
from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path

import mlflow.pyfunc
import numpy as np
import torch
from torch import nn

SPEC_FORMAT = 1
MODEL_NAME = "model"
"""Artifact path of the logged model: runs:/<run id>/model."""
CODE = Path(__file__).with_name("mlflow_model_code.py")
"""The models-from-code entry MLflow copies into the model and runs at load time."""
PREDICT_BATCH = 500
"""Batches of the evaluation pass (`algorithms.base.EVAL_BATCH_SIZE`): the same numbers as the run's test metrics."""


class Predictor(nn.Module):
    """uint8 images [N, H, W, C] -> logits [N, C]: normalisation, the student, the algorithm's head
    (clip_adapter: CLIP preprocessing, the frozen CLIP image encoder, the adapter, the class prompts)."""

    def __init__(self, spec: dict, weights: dict[str, torch.Tensor]):
        from fedplatform.models.backbones import create_model
        from fedplatform.plugins import import_plugins

        super().__init__()
        import_plugins(spec.get("plugins", []))  # the run's plug-in model, if any
        height, _, channels = spec["input_shape"]
        self.spec = spec
        self.batch = PREDICT_BATCH
        weights = dict(weights)
        self.head = spec["head"]
        if self.head == "clip_adapter":
            self._load_clip_adapter(spec["clip"], weights)
            self.eval()
            return
        if self.head == "retrained_classifier":
            self.register_buffer("head_weight", weights.pop("retrained_classifier.weight"))
            self.register_buffer("head_bias", weights.pop("retrained_classifier.bias"))
        elif self.head != "classifier":
            raise ValueError(f"fedplatform model spec: unknown head {self.head!r} "
                             "(classifier, retrained_classifier, clip_adapter)")
        self.net = create_model(spec["model"], spec["num_classes"], in_channels=channels, image_size=height)
        self.net.load_state_dict(weights)
        self.eval()

    def _load_clip_adapter(self, clip: dict, weights: dict[str, torch.Tensor]) -> None:
        """The run's frozen CLIP through the project's loader (never untrained weights in place of a
        tag or file), its class prompts, and the adapter (FedCLIP's `_predict`)."""
        from fedplatform.algorithms.fedclip import logit_scale
        from fedplatform.errors import UserError
        from fedplatform.models.adapters import AttentionAdapter
        from fedplatform.models.clip import clip_with_prototypes
        from fedplatform.models.feature_cache import DEFAULT_BATCH_SIZE

        need = f"this model needs the run's frozen CLIP {clip['model']} ({clip['weights']})"
        try:
            self.clip, self.preprocess, info, text = clip_with_prototypes(
                clip["model"], clip["pretrained"], self.spec["class_names"], clip["prompt_template"],
                clip["clean_class_names"])
        except UserError as exc:
            raise UserError(f"{need}: {exc}") from None
        if info.weights != clip["weights"]:
            raise UserError(f"{need}, but {clip['pretrained']} holds {info.weights}; give it the run's weights")
        self.register_buffer("text", text)
        self.scale = logit_scale(self.clip)
        self.adapter = AttentionAdapter(info.embed_dim)
        self.adapter.load_state_dict(weights)
        self.batch = DEFAULT_BATCH_SIZE  # the batches the run's feature cache was encoded in

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        from fedplatform.models.augment import normalize

        if self.head == "clip_adapter":
            from fedplatform.models.feature_cache import pixel_images

            x = torch.stack([self.preprocess(im) for im in pixel_images(images.cpu().numpy())])
            f = self.adapter(self.clip.encode_image(x.to(self.text.device)).float())
            return self.scale * (f @ self.text.t())  # the cosines FedCLIP's evaluate takes the argmax of
        x = normalize(images, self.spec["norm_mean"], self.spec["norm_std"])
        if self.head == "classifier":
            return self.net(x)
        return self.net.features(x) @ self.head_weight.t() + self.head_bias  # as CReFF.evaluate computes it

    @torch.no_grad()
    def probabilities(self, images: np.ndarray) -> np.ndarray:
        """Softmax of the logits, computed in evaluation-sized batches."""
        images = torch.from_numpy(np.ascontiguousarray(images))
        out = [torch.softmax(self(images[i:i + self.batch]), dim=1) for i in range(0, len(images), self.batch)]
        return (torch.cat(out) if out else torch.zeros(0, self.spec["num_classes"])).numpy()


class FedplatformModel(mlflow.pyfunc.PythonModel):
    """The pyfunc wrapper: rebuilds a `Predictor` from the `spec` and `weights` artifacts."""

    def load_context(self, context) -> None:
        from safetensors.torch import load_file

        spec = json.loads(Path(context.artifacts["spec"]).read_text())
        self.predictor = Predictor(spec, load_file(context.artifacts["weights"]))

    def predict(self, context, model_input: np.ndarray, params=None) -> np.ndarray:
        """uint8 images [N, H, W, C] -> class probabilities [N, num_classes] (float32)."""
        return self.predictor.probabilities(np.asarray(model_input))


def model_spec(cfg, ds, algorithm) -> dict:
    from fedplatform import __version__
    from fedplatform.algorithms.images import input_shape

    return {
        "format": SPEC_FORMAT,
        "fedplatform_version": __version__,
        "algorithm": cfg.algorithm.name,
        "head": algorithm.predict_head,
        "model": cfg.model.name,
        "plugins": list(cfg.plugins),
        "num_classes": ds.num_classes,
        "class_names": list(ds.class_names),
        "input_shape": list(input_shape(cfg, ds.image_shape)),
        "input_dtype": "uint8",
        "input_view": "pixels" if ds.image_shape is not None else
                      f"RGB, resized to {cfg.model.input_size * 256 // 224} and centre-cropped to {cfg.model.input_size}",
        "norm_mean": list(ds.norm_mean),
        "norm_std": list(ds.norm_std),
        "dataset": ds.dataset,
        "dataset_fingerprint": ds.fingerprint,
    } | algorithm.predict_spec(cfg, ds)


def log_model(tracking_uri: str, run_id: str, cfg, ds, state: dict[str, torch.Tensor]):
    """Log the final `state` as the pyfunc model `model` of `run_id` (and register it under
    tracking.register_model); None, logging nothing, for an algorithm without `predict_head`."""
    from mlflow.entities import LoggedModelOutput
    from mlflow.models import Model, ModelSignature
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from mlflow.types import Schema, TensorSpec
    from safetensors.torch import save_file

    from fedplatform.algorithms import get_algorithm

    algorithm = get_algorithm(cfg.algorithm.name)
    if algorithm.predict_head is None:
        return None
    spec = model_spec(cfg, ds, algorithm)
    shape = tuple(spec["input_shape"])
    signature = ModelSignature(inputs=Schema([TensorSpec(np.dtype(np.uint8), (-1, *shape))]),
                               outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, spec["num_classes"]))]))
    example = ds.pixels(ds.test_ids[:2]) if ds.image_shape is not None and len(ds.test_ids) else \
        np.zeros((1, *shape), np.uint8)
    if "clip" in spec:
        example = None  # MLflow would load the model here to try it: the frozen CLIP, on the driver
    with tempfile.TemporaryDirectory() as tmp:
        weights, spec_file = Path(tmp) / "model.safetensors", Path(tmp) / "fedplatform_model.json"
        save_file({k: v.contiguous() for k, v in algorithm.inference_state(state).items()}, str(weights))
        spec_file.write_text(json.dumps(spec, indent=2))
        with _use_tracking_uri(tracking_uri), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")  # on purpose, above
            # Created here, in the run's experiment (Model.log alone files it under the active, default
            # experiment, where runs:/<id>/model does not look), and linked to the run below: Model.log
            # given the run would also copy every metric's history onto the model (~0.5 s).
            client = mlflow.MlflowClient(tracking_uri)
            logged = client.create_logged_model(client.get_run(run_id).info.experiment_id, name=MODEL_NAME,
                                                source_run_id=run_id)
            info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, model_id=logged.model_id,
                             python_model=str(CODE), artifacts={"weights": str(weights), "spec": str(spec_file)},
                             signature=signature, input_example=example, pip_requirements=requirements(spec),
                             registered_model_name=cfg.tracking.register_model)
            client.log_outputs(run_id, [LoggedModelOutput(logged.model_id, step=cfg.rounds)])
    return info


def requirements(spec: dict) -> list[str]:
    """Declared, not inferred (inference would load the model in a subprocess: seconds per run)."""
    from importlib.metadata import version

    import safetensors

    from fedplatform import __version__

    reqs = [f"fedplatform=={__version__}", f"torch=={torch.__version__.split('+')[0]}",
            f"safetensors=={safetensors.__version__}", f"numpy=={np.__version__}", f"mlflow=={mlflow.__version__}"]
    return reqs + ([f"open_clip_torch=={version('open_clip_torch')}"] if "clip" in spec else [])


def load_predictor(run: str, tracking_uri: str | None = None) -> Predictor:
    """A `Predictor` from a logged model: a local model directory, a `runs:/` or `models:/` URI, or a
    run id (its `model` artifact), downloaded from the tracking store `tracking_uri` (default as `run`)."""
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri
    from safetensors.torch import load_file

    from fedplatform.errors import UserError
    from fedplatform.tracking.mlflow_run import resolve_uri

    folder = Path(run).expanduser()
    if not folder.is_dir():
        uri = run if "://" in run or run.startswith(("runs:/", "models:/")) else f"runs:/{run}/{MODEL_NAME}"
        store = resolve_uri(tracking_uri, None)
        try:
            # runs:/<id>/model finds the run's logged model in the *active* store only, whatever tracking_uri says
            with _use_tracking_uri(store):
                folder = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, tracking_uri=store))
        except Exception as exc:  # noqa: BLE001 - MLflow raises several kinds for a missing run or model
            raise UserError(f"load_model({run!r}): no logged model there ({str(exc).splitlines()[0]}); give a run "
                            "id of a finished run with a model, a runs:/ or models:/ URI, or a model directory") from None
    specs = sorted(folder.rglob("fedplatform_model.json"))
    if not specs:
        raise UserError(f"load_model({run!r}): {folder} holds no fedplatform_model.json; give the directory of a "
                        "model fedplatform logged (the run's `model` artifact)")
    return Predictor(json.loads(specs[0].read_text()), load_file(str(specs[0].with_name("model.safetensors"))))
