"""The sampler: logits of the rows that sample this step -> one token id each (+ logprobs).

Device-agnostic torch on whatever device the logits live on. Greedy rows are one argmax for the
whole batch; rows with penalties or random sampling are processed in vectorized groups. Seeded
requests own a ``torch.Generator`` so their draws do not depend on the rest of the batch;
unseeded ones share the engine's generator.

``sample_ids`` and ``logprob_tensors`` never wait for the device (no ``.item()``, no
``.tolist()``, host lists reach the device through pinned copies): their results stay on the
device, so the engine can launch the next step before it reads them (async scheduling). A
request whose previous token is still in flight on the device (a placeholder) passes it as
``pending``: penalties count it from the device tensor. ``sample`` adds the host lists and
logprobs, which wait.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from portaserve.core.request import Request


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    #: Per row: {token_id: logprob} for the chosen token and the top-n, or None when not asked.
    logprobs: list[dict[int, float] | None]


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._generators: dict[tuple[str, torch.device], torch.Generator] = {}
        self._shared: dict[torch.device, torch.Generator] = {}

    def forget(self, request_id: str) -> None:
        """Drop a finished request's generator."""
        for key in [k for k in self._generators if k[0] == request_id]:
            del self._generators[key]

    def sample(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        num_generated: list[int] | None = None,
    ) -> SamplerOutput:
        """``logits`` [L, V] (any float dtype), one row per request in ``requests`` order.

        ``num_generated``: tokens each request generated before this one (for min_tokens);
        defaults to ``len(request.output_token_ids)``.
        """
        ids = self.sample_ids(logits, requests, num_generated)
        tensors = self.logprob_tensors(logits, ids, requests)
        token_ids = ids.tolist()
        host = None if tensors is None else tuple(t.cpu() for t in tensors)
        return SamplerOutput(token_ids, logprob_dicts(host, token_ids, requests))

    def sample_ids(
        self,
        logits: torch.Tensor,
        requests: list[Request],
        num_generated: list[int] | None = None,
        pending: dict[int, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """The chosen ids [L] int64, on the logits' device, without waiting for the device.

        ``pending``: logits row -> that request's token still in flight (a 1-element int64
        tensor on the device), which ``request.output_token_ids`` does not hold yet.

        Greedy rows without penalties take the argmax of the logits as given (exact in any
        dtype: a bf16 batch skips its float32 copy); penalties and sampling run in float32."""
        greedy = [r.sampling_params.is_greedy for r in requests]
        penalized = [i for i, r in enumerate(requests) if r.sampling_params.has_penalties]
        if penalized or not all(greedy):
            logits = logits.float()
        if num_generated is None:
            num_generated = [len(r.output_token_ids) for r in requests]
        logits = self._apply_penalties(logits, requests, penalized, pending or {})
        logits = self._mask_min_tokens(logits, requests, num_generated)
        if all(greedy):
            return logits.argmax(dim=-1)
        chosen = torch.empty(len(requests), dtype=torch.long, device=logits.device)
        rows = [i for i, g in enumerate(greedy) if g]
        if rows:
            idx = _to_device(rows, logits.device)
            chosen[idx] = logits[idx].argmax(dim=-1)
        for row, is_greedy in enumerate(greedy):
            if not is_greedy:
                chosen[row] = self._sample_row(logits[row], requests[row])
        return chosen

    # -- steps -----------------------------------------------------------------------------

    def logprob_tensors(
        self, logits: torch.Tensor, ids: torch.Tensor, requests: list[Request]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """On the device, for the rows that asked for logprobs (None when none did): the
        log-softmax of the raw logits (before penalties, as vLLM reports them) at the chosen
        ids [L], and the top-n values and ids [L, n_max] (``logprob_dicts`` makes the dicts)."""
        wanted = [r.sampling_params.logprobs for r in requests]
        if all(n is None for n in wanted):
            return None
        raw = torch.log_softmax(logits.float(), dim=-1)  # [L, V]
        chosen = raw.gather(1, ids.view(-1, 1)).view(-1)
        top = max(n or 0 for n in wanted)
        if top:
            values, top_ids = raw.topk(top, dim=-1)
        else:
            values = raw.new_empty((raw.shape[0], 0))
            top_ids = ids.new_empty((raw.shape[0], 0))
        return chosen, values, top_ids

    def _apply_penalties(
        self, logits: torch.Tensor, requests: list[Request], rows: list[int], pending: dict[int, torch.Tensor]
    ) -> torch.Tensor:
        """The penalties of the requests at ``rows`` (those that set any), on a copy of ``logits``
        (no rows: ``logits`` itself)."""
        if not rows:
            return logits
        logits = logits.clone()
        vocab = logits.shape[1]
        for i in rows:
            p = requests[i].sampling_params
            row = logits[i]
            extra = pending.get(i)  # the token in flight (sampled from these logits: < vocab)
            if p.repetition_penalty != 1.0:
                # as in vLLM / HF: every token seen in the prompt or the output
                known = sorted(t for t in set(requests[i].all_token_ids) if t < vocab)
                seen = _to_device(known, row.device)
                if extra is not None:
                    seen = torch.cat((seen, extra))  # a repeat is harmless: same value written
                vals = row[seen]
                row[seen] = torch.where(vals > 0, vals / p.repetition_penalty,
                                        vals * p.repetition_penalty)
            if p.presence_penalty != 0.0 or p.frequency_penalty != 0.0:
                out = [t for t in requests[i].output_token_ids if t < vocab]
                if out or extra is not None:
                    counts = torch.zeros(vocab, dtype=row.dtype, device=row.device)
                    if out:
                        counts.index_add_(0, _to_device(out, row.device),
                                          torch.ones(len(out), dtype=row.dtype, device=row.device))
                    if extra is not None:
                        counts.index_add_(0, extra, torch.ones(1, dtype=row.dtype, device=row.device))
                    row -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(row.dtype)
        return logits

    def _mask_min_tokens(
        self, logits: torch.Tensor, requests: list[Request], num_generated: list[int]
    ) -> torch.Tensor:
        cloned = False
        for i, r in enumerate(requests):
            p = r.sampling_params
            if p.min_tokens and num_generated[i] < p.min_tokens:
                banned = [t for t in (*r.eos_token_ids, *p.stop_token_ids) if t < logits.shape[1]]
                if banned:
                    if not cloned:
                        logits, cloned = logits.clone(), True
                    logits[i].index_fill_(0, _to_device(banned, logits.device), float("-inf"))
        return logits

    def _generator(self, request: Request, device: torch.device) -> torch.Generator:
        seed = request.sampling_params.seed
        if seed is None:
            gen = self._shared.get(device)
            if gen is None:
                gen = self._shared[device] = torch.Generator(device=device).manual_seed(self._seed)
            return gen
        key = (request.request_id, device)
        gen = self._generators.get(key)
        if gen is None:
            gen = self._generators[key] = torch.Generator(device=device).manual_seed(seed)
        return gen

    def _sample_row(self, row: torch.Tensor, request: Request) -> torch.Tensor:
        """One draw for one row: a 0-d int64 tensor on the row's device (no host sync)."""
        p = request.sampling_params
        row = row / p.temperature  # [V]
        if p.top_k > 0 and p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, dim=-1)
        if p.min_p > 0.0:
            probs = probs.masked_fill(probs < p.min_p * probs.max(), 0.0)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            cum = sorted_probs.cumsum(0)
            # keep the smallest prefix whose mass reaches top_p (always the top token)
            drop = (cum - sorted_probs) >= p.top_p * cum[-1]
            sorted_probs = sorted_probs.masked_fill(drop, 0.0)
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        gen = self._generator(request, probs.device)
        return torch.multinomial(probs, 1, generator=gen)[0]



def logprob_dicts(
    host: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
    token_ids: list[int],
    requests: list[Request],
) -> list[dict[int, float] | None]:
    """Per row, {token_id: logprob} for its top-n and the chosen token, from the host copies
    of ``Sampler.logprob_tensors``; None for rows that did not ask."""
    if host is None:
        return [None] * len(requests)
    chosen, values, ids = (t.tolist() for t in host)
    result: list[dict[int, float] | None] = []
    for i, r in enumerate(requests):
        n = r.sampling_params.logprobs
        if n is None:
            result.append(None)
            continue
        entry = dict(zip(ids[i][:n], values[i][:n], strict=True))
        entry[token_ids[i]] = chosen[i]
        result.append(entry)
    return result


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """int64 ids on ``device`` through pinned memory, so the copy queues behind the device's
    work instead of waiting for it (a pageable copy would wait)."""
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)
