"""generate, chat, embed, rerank."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from zinfer.cli.common import Endpoint, Timeout, command, console, fail, make_client, print_json, print_table
from zinfer.shared.handles import EmbeddingHandle, RerankHandle

Uid = Annotated[str, typer.Option("--model-uid", "-u", help="The launched model's uid.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Most tokens to generate (also --max_tokens).")]
Stream = Annotated[bool, typer.Option("--stream/--no-stream",
                                      help="Print tokens as they come (also --stream true|false).")]
Temperature = Annotated[float | None, typer.Option("--temperature", help="0 for greedy decoding.")]


def _config(max_tokens, stream, temperature) -> dict:
    cfg = {"stream": stream}
    if max_tokens is not None:
        cfg["max_tokens"] = max_tokens
    if temperature is not None:
        cfg["temperature"] = temperature
    return cfg


def generate(
    model_uid: Uid,
    prompt: Annotated[str | None, typer.Argument(help="The prompt (asked for when left out).")] = None,
    max_tokens: MaxTokens = None,
    stream: Stream = True,
    temperature: Temperature = None,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Complete a prompt; without one, asks for prompts until an empty line or Ctrl-D."""
    with make_client(endpoint, timeout) as client:
        model = client.get_model(model_uid)
        if isinstance(model, EmbeddingHandle | RerankHandle):  # before asking for a prompt
            raise model.not_llm("generate")
        prompts = [prompt] if prompt is not None else None
        while True:
            if prompts is None:
                try:
                    text = input("Prompt: ")
                except EOFError:
                    return
                if not sys.stdin.isatty():
                    sys.stdout.write(text + "\n")
                if not text.strip():
                    return
            else:
                if not prompts:
                    return
                text = prompts.pop()
            result = model.generate(text, _config(max_tokens, stream, temperature))
            if stream:
                for chunk in result:
                    sys.stdout.write(chunk["choices"][0]["text"])
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                typer.echo(result["choices"][0]["text"])


def chat(
    model_uid: Uid,
    message: Annotated[str | None, typer.Argument(
        help="A message: answered once, then the command ends (without one, an interactive chat).")] = None,
    max_tokens: MaxTokens = None,
    stream: Stream = True,
    temperature: Temperature = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt")] = None,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Chat: one MESSAGE answered, or an interactive chat that keeps the history (an empty line or Ctrl-D ends it)."""
    with make_client(endpoint, timeout) as client:
        model = client.get_model(model_uid)
        if isinstance(model, EmbeddingHandle | RerankHandle):
            raise model.not_llm("chat")
        abilities = client.describe_model(model_uid)["model_ability"]
        if "chat" not in abilities:  # say so before asking for a message
            fail(f"model_uid: model {model_uid!r} cannot chat (abilities {abilities}); use zinfer generate")
        history = [{"role": "system", "content": system_prompt}] if system_prompt else []
        pending = [message] if message is not None else None
        while True:
            if pending is not None:
                if not pending:
                    return
                text = pending.pop()
            else:
                try:
                    text = input("User: ")
                except EOFError:
                    return
                if not sys.stdin.isatty():  # piped input is not echoed: show what was said
                    sys.stdout.write(text + "\n")
                if not text.strip():
                    return
            history.append({"role": "user", "content": text})
            result = model.chat(messages=history, generate_config=_config(max_tokens, stream, temperature))
            if pending is None:
                sys.stdout.write("Assistant: ")
            if stream:
                answer = ""
                for chunk in result:
                    piece = chunk["choices"][0]["delta"].get("content") or ""
                    answer += piece
                    sys.stdout.write(piece)
                    sys.stdout.flush()
            else:
                answer = result["choices"][0]["message"]["content"]
                sys.stdout.write(answer)
            sys.stdout.write("\n")
            history.append({"role": "assistant", "content": answer})


def embed(
    model_uid: Uid,
    texts: Annotated[list[str], typer.Argument(help="One or more texts.")],
    as_json: Annotated[bool, typer.Option("--json", help="The full embedding object.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Embed texts; prints one summary line per text (or the full JSON)."""
    if not texts:
        fail("give at least one TEXT")
    with make_client(endpoint, timeout) as client:
        result = client.get_model(model_uid).create_embedding(texts)
    if as_json:
        print_json(result)
        return
    for item, text in zip(result["data"], texts, strict=True):
        vec = item["embedding"]
        head = ", ".join(f"{v:.4f}" for v in vec[:4])
        console.print(f"[{item['index']}] dim={len(vec)} [{head}, ...]  {text[:60]!r}", highlight=False)
    console.print(f"usage: {result['usage']}", highlight=False)


def rerank(
    model_uid: Uid,
    query: Annotated[str, typer.Option("--query", "-q", help="What the documents are ranked against.")],
    documents: Annotated[list[str], typer.Argument(help="The documents to rank.")],
    top_n: Annotated[int | None, typer.Option("--top-n", help="Keep the best N.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="The full rerank response.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Rank documents by relevance to a query, best first: score, index and text of each."""
    with make_client(endpoint, timeout) as client:
        result = client.get_model(model_uid).rerank(documents, query, top_n=top_n, return_documents=as_json,
                                                    return_len=as_json)
    if as_json:
        print_json(result)
        return
    rows = [[f"{item['relevance_score']:.6f}", item["index"], documents[item["index"]][:70]]
            for item in result["results"]]
    print_table(["Score", "Index", "Document"], rows)


def install(app: typer.Typer) -> None:
    for fn in (generate, chat, embed, rerank):
        command(app, fn)
