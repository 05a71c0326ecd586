"""A decoder exported for generation over its key/value cache, and the greedy loop that serves it in ONNX Runtime.

The artifact speaks the names of ONNX Runtime's and Optimum's causal-LM tooling:

    inputs   input_ids       [batch, sequence]
             attention_mask  [batch, past_sequence + sequence]   (1: a real token, 0: left padding)
             position_ids    [batch, sequence]
             past_key_values.{i}.key / .value   [batch, kv_heads_i, past_sequence, head_dim]
    outputs  logits          [batch, 1, vocab]                   (the last position only)
             present.{i}.key / .value           [batch, kv_heads_i, past_sequence + sequence, head_dim]

`i` is the model's layer index. Each layer's KV-head count and head_dim are concrete dimensions of its inputs, so a
runtime that sizes the cache from the graph's shapes (onnxruntime-genai) sees the pruned counts; config.json records
them too (`head_dim`, `num_key_value_heads_per_layer`). A layer whose attention was removed has no cache entries at
all: its index is absent from the inputs and outputs, and config.json gives it 0 KV heads. Prefill feeds an empty past
(past_sequence 0) and the whole prompt; each decode step feeds one token and the cache the step before returned. A
model with no attention left takes neither a cache nor an attention_mask (nothing reads them).

The request phase times a whole greedy request per call (GenerationRequest, loaded by `serving_runtime`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from ziplm.errors import BadInputError
from ziplm.families import adapter_for
from ziplm.families.decoder import DecoderAdapter
from ziplm.runtimes import InferenceEnv, Session
from ziplm.runtimes.base import Runtime, RuntimeInfo, get_runtime
from ziplm.runtimes.onnxruntime_cpu import OrtSession
from ziplm.runtimes.paired import Feeds
from ziplm.stages.export import ExportParityError, export_checked, export_model, write_onnx, writes_program

PAST, PRESENT = "past_key_values", "present"
# The shape the graph is traced at: two rows (the second left-padded, so masking is traced from real data), a prompt
# of three tokens on a cache of five.
TRACE_BATCH, TRACE_SEQUENCE, TRACE_PAST = 2, 3, 5


def decoder_adapter(model: PreTrainedModel) -> DecoderAdapter:
    adapter = adapter_for(model.config)
    if not isinstance(adapter, DecoderAdapter):
        raise BadInputError(f"{model.config.model_type} is not a decoder: only a causal language model is exported "
                            "for generation")
    return adapter


def attending_layers(model: PreTrainedModel) -> list[int]:
    """The layers that still have attention, hence a cache entry (none: the model generates without a cache, each
    token from itself and its position)."""
    adapter = decoder_adapter(model)
    return [index for index, layer in enumerate(adapter.layers(model)) if adapter.has_attention(layer)]


def cache_names(prefix: str, layers: list[int]) -> list[str]:
    return [f"{prefix}.{layer}.{part}" for layer in layers for part in ("key", "value")]


class _GenerationCall(nn.Module):
    """The model as the artifact sees it: flat cache tensors in, last-position logits and the grown cache out."""

    def __init__(self, model: PreTrainedModel) -> None:
        super().__init__()
        self.model = model
        self.adapter = decoder_adapter(model)
        self.layers = attending_layers(model)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        cache = self.adapter.generation_cache(self.model)
        for n, layer in enumerate(self.layers):
            cache.update(past[2 * n], past[2 * n + 1], layer)
        output = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            past_key_values=cache, use_cache=cache is not None, logits_to_keep=1)
        present = [tensor for layer in self.layers for tensor in (cache.layers[layer].keys, cache.layers[layer].values)]
        return (output.logits, *present)


def export_for_generation(model: PreTrainedModel, path: Path, program: bool = False) -> Path:
    """Export a decoder (dense or pruned, fp32) as the generation artifact described above, written atomically (with
    `program`, its torch.export program beside it)."""
    adapter, layers = decoder_adapter(model), attending_layers(model)  # no layer: no cache inputs or outputs
    config, head_dim = model.config, adapter.shape(model.config).head_dim
    kv_heads = adapter.kv_heads(config)
    generator = torch.Generator().manual_seed(0)
    total = TRACE_PAST + TRACE_SEQUENCE
    attention_mask = torch.ones(TRACE_BATCH, total, dtype=torch.long)
    attention_mask[-1, :2] = 0
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (TRACE_BATCH, TRACE_SEQUENCE), generator=generator),
              "attention_mask": attention_mask,
              "position_ids": torch.from_numpy(positions(attention_mask.numpy())[:, -TRACE_SEQUENCE:])}
    for layer in layers:
        for name in cache_names(PAST, [layer]):
            inputs[name] = torch.randn(TRACE_BATCH, kv_heads[layer], TRACE_PAST, head_dim, generator=generator)
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "attention_mask": {0: "batch", 1: "total_sequence"},
            "position_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch"},
            **{name: {0: "batch", 2: "past_sequence"} for name in cache_names(PAST, layers)},
            **{name: {0: "batch", 2: "total_sequence"} for name in cache_names(PRESENT, layers)}}
    return write_onnx(_GenerationCall(model), path, inputs, ["logits", *cache_names(PRESENT, layers)], axes, program)


def phase_feeds(env: InferenceEnv, vocab_size: int, seed: int = 0) -> Feeds:
    """What a generation artifact is fed for one timed call in the environment's phase, sized from the file's own
    cache inputs: prefill (and a request, which starts with it), a prompt of sequence_length tokens on an empty
    cache; decode, one token on a cache of context_length tokens (random keys and values)."""
    if env.phase == "sequence":
        raise ValueError("the whole-sequence phase times model.onnx, not the generation artifact")
    new, past = (1, env.context_length) if env.phase == "decode" else (env.sequence_length, 0)

    def feeds(session: Session) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(seed)
        batch = env.batch_size
        inputs = {"input_ids": rng.integers(0, vocab_size, (batch, new), dtype=np.int64),
                  "attention_mask": np.ones((batch, past + new), np.int64),
                  "position_ids": np.broadcast_to(np.arange(past, past + new, dtype=np.int64), (batch, new)).copy()}
        for name, shape in session.input_shapes.items():
            if name.startswith(PAST):  # [batch, kv_heads, past_sequence, head_dim]
                inputs[name] = rng.standard_normal((batch, shape[1], past, shape[3]), np.float32)
        return inputs

    return feeds


GENERATION_ONNX = "generation.onnx"
PARITY_PROMPT, PARITY_TOKENS = 16, 32  # greedy generation that must match transformers' token for token


def served_file(env: InferenceEnv) -> str:
    """The name of the file that is served, and timed, in the environment's phase."""
    return "model.onnx" if env.phase == "sequence" else GENERATION_ONNX


def export_served_checked(model: PreTrainedModel, path: Path, env: InferenceEnv) -> str:
    """Export the file served in the environment's phase and check it against PyTorch (the whole-sequence model:
    outputs within the precision's tolerance; the generation artifact: greedy tokens equal to transformers'); says
    what was checked."""
    if env.phase == "sequence":
        return f"parity {export_checked(model, path, env).max_abs_diff:.1e}"
    parity = check_generation(model, export_for_generation(model, path, writes_program(env)), generation_prompt(model),
                              PARITY_TOKENS)
    return f"greedy generation equal to transformers' for {parity.new_tokens} tokens"


def generation_prompt(model: PreTrainedModel) -> np.ndarray:
    """The prompt generation parity is checked on: random tokens, one row."""
    return adapter_for(model.config).example_inputs(model.config, 1, PARITY_PROMPT)["input_ids"]


def export_served(model: PreTrainedModel, path: Path, env: InferenceEnv) -> Path:
    """The file that is timed and served in the environment's phase: the whole-sequence model, or, for the phases
    of generation, the generation artifact."""
    if env.phase == "sequence":
        return export_model(model, path, env.batch_size, env.sequence_length, writes_program(env))
    return export_for_generation(model, path, writes_program(env))


def served_feeds(config: PretrainedConfig, env: InferenceEnv) -> Feeds:
    """What a file of `export_served` is fed for one timed call."""
    if env.phase == "sequence":
        example = adapter_for(config).example_inputs(config, env.batch_size, env.sequence_length)
        return lambda _: example
    return phase_feeds(env, config.vocab_size)


def positions(attention_mask: np.ndarray) -> np.ndarray:
    """Each token's position counted over the real tokens of its row (left padding gets 1), as transformers'
    generate computes it."""
    position_ids = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 1, position_ids).astype(np.int64)


def onnx_greedy_generate(session: Session, input_ids: np.ndarray, new_tokens: int,
                         attention_mask: np.ndarray | None = None, stop: StopTokens | None = None) -> np.ndarray:
    """Greedy decoding with a loaded generation artifact (any runtime's session): prefill on an empty cache, then one
    token per step over the cache. Returns the prompt followed by up to `new_tokens` tokens per row; a row that
    produced a stop token continues with padding, and decoding ends once every row has (as transformers' generate)."""
    batch = input_ids.shape[0]
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask.astype(np.int64)
    names = set(session.input_names)  # a model without attention takes no attention_mask
    cache = {name: np.zeros((batch, shape[1], 0, shape[3]), np.float32)
             for name, shape in session.input_shapes.items() if name.startswith(PAST)}
    tokens, step = input_ids.astype(np.int64), input_ids.astype(np.int64)
    finished = np.zeros(batch, dtype=bool)
    for _ in range(new_tokens):
        feed = {"input_ids": step, "attention_mask": mask, "position_ids": positions(mask)[:, -step.shape[1]:]}
        logits, *present = session.run({name: value for name, value in feed.items() if name in names} | cache)
        step = logits[:, -1].argmax(-1).astype(np.int64)[:, None]
        if stop is not None:
            step[finished] = stop.pad
            finished |= np.isin(step[:, 0], stop.tokens)
        tokens, mask = np.concatenate([tokens, step], 1), np.concatenate([mask, np.ones_like(step)], 1)
        cache = dict(zip(cache, present))  # present.{i}.key/value come in the order past_key_values.{i} went in
        if finished.all():
            break
    return tokens


class GenerationRequest:
    """A loaded generation artifact served a whole request per call: `run` takes the prefill's feeds (the prompt)
    and generates `new_tokens` tokens greedily over the cache (onnx_greedy_generate, no stop tokens); it returns the
    prompt and the new tokens."""

    def __init__(self, session: Session, new_tokens: int) -> None:
        self.session = session
        self.new_tokens = new_tokens
        self.input_names = session.input_names
        self.input_shapes = session.input_shapes

    def run(self, inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
        return [onnx_greedy_generate(self.session, inputs["input_ids"], self.new_tokens,
                                     inputs.get("attention_mask"))]


class RequestRuntime(Runtime):
    """A runtime whose loaded generation artifacts serve whole requests (GenerationRequest): what the request phase
    times, paired like any other file."""

    def __init__(self, runtime: Runtime, new_tokens: int) -> None:
        self.runtime = runtime
        self.new_tokens = new_tokens
        self.name = runtime.name

    def load(self, onnx_path: Path) -> GenerationRequest:
        return GenerationRequest(self.runtime.load(onnx_path), self.new_tokens)

    def info(self) -> RuntimeInfo:
        return self.runtime.info()


def serving_runtime(env: InferenceEnv) -> Runtime:
    """The environment's runtime, loading files as its phase serves them: in the request phase, each call a whole
    request."""
    runtime = get_runtime(env)
    return RequestRuntime(runtime, env.new_tokens or 1) if env.phase == "request" else runtime


@dataclass(frozen=True)
class StopTokens:
    """Tokens that end a row's generation, and the token that pads a finished row."""

    tokens: tuple[int, ...]
    pad: int

    @classmethod
    def of(cls, model: PreTrainedModel) -> StopTokens | None:
        """The model's own generation settings (its end-of-sequence tokens; padding: its pad token, else the first
        end-of-sequence token), as transformers' generate reads them."""
        settings = model.generation_config
        eos = settings.eos_token_id
        if eos is None:
            return None
        tokens = tuple(eos) if isinstance(eos, (list, tuple)) else (eos,)
        return cls(tokens, tokens[0] if settings.pad_token_id is None else settings.pad_token_id)


def torch_greedy_generate(model: PreTrainedModel, input_ids: np.ndarray, new_tokens: int,
                          attention_mask: np.ndarray | None = None) -> np.ndarray:
    """transformers' own `generate`, greedy, over the family's generation cache, with the model's stop tokens."""
    mask = np.ones_like(input_ids) if attention_mask is None else attention_mask
    cache = decoder_adapter(model).generation_cache(model)
    with torch.no_grad():
        output = model.eval().generate(torch.from_numpy(input_ids), attention_mask=torch.from_numpy(mask),
                                       max_new_tokens=new_tokens, do_sample=False, past_key_values=cache,
                                       use_cache=cache is not None)
    return output.numpy()


@dataclass
class GenerationParity:
    """What was compared: `new_tokens` per row (fewer than asked where every row stopped early), `rows` prompts."""

    new_tokens: int
    rows: int


def check_generation(model: PreTrainedModel, onnx_path: Path, input_ids: np.ndarray, new_tokens: int = 32,
                     attention_mask: np.ndarray | None = None) -> GenerationParity:
    """Greedy generation with the artifact in ONNX Runtime must equal transformers' `generate` token for token;
    raises ExportParityError naming the first row and step that differ."""
    import onnxruntime as ort  # the runtime of record for parity

    session = OrtSession(ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"]))
    actual = onnx_greedy_generate(session, input_ids, new_tokens, attention_mask, StopTokens.of(model))
    expected = torch_greedy_generate(model, input_ids, new_tokens, attention_mask)
    if actual.shape != expected.shape:
        raise ExportParityError(f"generation with {onnx_path} gave {actual.shape[1]} tokens per row, transformers' "
                                f"generate {expected.shape[1]}")
    prompt = input_ids.shape[1]
    for row, (ours, theirs) in enumerate(zip(actual[:, prompt:], expected[:, prompt:])):
        differ = np.flatnonzero(ours != theirs)
        if differ.size:
            step = int(differ[0])
            raise ExportParityError(f"generation with {onnx_path} differs from transformers' generate: row {row}, "
                                    f"new token {step}: {ours[step]} vs {theirs[step]}")
    return GenerationParity(actual.shape[1] - prompt, input_ids.shape[0])
