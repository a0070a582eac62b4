"""Rerank on the compute loop: each request's (query, document) pairs batch with other requests' pairs, as
embeddings do (services/worker/instance/embed_batcher.py), up to `max_batch_size` pairs and `max_batch_tokens` padded
tokens a step. Pairs longer than the model's max_tokens are truncated by the model, as Xinference's are, so no
pair is refused for its length. When a request's last pair is scored, its documents are ordered best first (ties
as Xinference orders them: numpy's argsort, reversed) and cut to its top_n.
"""

from __future__ import annotations

import numpy as np

from zinfer.services.worker.instance.embed_batcher import EmbeddingBatcher, _Work
from zinfer.shared import protocol as p


class RerankBatcher(EmbeddingBatcher):
    def _texts(self, msg: p.Rerank) -> list:
        return [(msg.query, document) for document in msg.documents]

    def _finish(self, work: _Work) -> None:
        if work.next < len(work.texts):
            return
        scores = work.parts[0] if len(work.parts) == 1 else np.concatenate(work.parts)
        order = np.argsort(scores)[::-1]
        top_n = work.job.msg.top_n
        if top_n is not None:
            order = order[:top_n]
        results = [p.RerankItem(int(i), float(scores[i])) for i in order]
        work.job.reply(p.RerankResult(model=self.uid, results=results, input_tokens=work.tokens))
