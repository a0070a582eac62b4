"""generate, chat, embed, rerank, transcribe, speak."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from zinfer.cli.common import Endpoint, Timeout, command, console, fail, make_client, print_json, print_table
from zinfer.shared.handles import EmbeddingHandle, RerankHandle

Uid = Annotated[str, typer.Option("--model-uid", "-u", help="The launched model's uid.")]
MaxTokens = Annotated[int | None, typer.Option("--max-tokens", help="Most tokens to generate (also --max_tokens).")]
Stream = Annotated[bool, typer.Option("--stream/--no-stream",
                                      help="Print tokens as they come (also --stream true|false).")]
Temperature = Annotated[float | None, typer.Option("--temperature", help="0 for greedy decoding.")]
LoraName = Annotated[str | None, typer.Option("--lora-name", help="The model's LoRA adapter that answers (also "
                                              "--lora_name; `zinfer lora list UID` shows them).")]


def _config(max_tokens, stream, temperature, lora_name=None) -> dict:
    cfg = {"stream": stream}
    if lora_name is not None:
        cfg["lora_name"] = lora_name
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
    lora_name: LoraName = None,
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
            result = model.generate(text, _config(max_tokens, stream, temperature, lora_name))
            if stream:
                for chunk in result:
                    sys.stdout.write(chunk["choices"][0]["text"])
                    sys.stdout.flush()
                sys.stdout.write("\n")
            else:
                typer.echo(result["choices"][0]["text"])


def _tools(path: str | None) -> list | None:
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            tools = json.load(f)
    except (OSError, ValueError) as exc:
        fail(f"tools: cannot read {path}: {exc}")
    return tools if isinstance(tools, list) else [tools]


def _tool_choice(value: str | None):
    if value is None or value in ("auto", "none", "required"):
        return value
    return {"type": "function", "function": {"name": value}}


def _show_answer(result, stream: bool) -> dict:
    """Print an answer: reasoning apart (dim, under "Thinking"), the text, then any tool calls as JSON. Returns the
    assistant message for the history."""
    reasoning, content, calls = "", "", {}
    if not stream:
        message = result["choices"][0]["message"]
        reasoning, content = message.get("reasoning_content") or "", message.get("content") or ""
        calls = {i: c for i, c in enumerate(message.get("tool_calls") or [])}
        if reasoning:
            console.print(f"[dim]Thinking: {reasoning}[/dim]", highlight=False)
        sys.stdout.write(content)
    else:
        thinking = False
        for chunk in result:
            if not chunk["choices"]:
                continue
            delta = chunk["choices"][0]["delta"]
            if delta.get("reasoning_content"):
                if not thinking:
                    console.print("[dim]Thinking: [/dim]", end="", highlight=False)
                    thinking = True
                reasoning += delta["reasoning_content"]
                console.print(f"[dim]{delta['reasoning_content']}[/dim]", end="", highlight=False, markup=True)
            if delta.get("content"):
                if thinking:
                    sys.stdout.write("\n")
                    thinking = False
                content += delta["content"]
                sys.stdout.write(delta["content"])
                sys.stdout.flush()
            for piece in delta.get("tool_calls") or []:
                call = calls.setdefault(piece["index"], {"id": None, "type": "function",
                                                         "function": {"name": None, "arguments": ""}})
                call["id"] = piece.get("id") or call["id"]
                call["function"]["name"] = piece["function"].get("name") or call["function"]["name"]
                call["function"]["arguments"] += piece["function"].get("arguments") or ""
    for call in calls.values():
        sys.stdout.write(("\n" if content else "") + "Tool call: ")
        print_json({"id": call["id"], "name": call["function"]["name"],
                    "arguments": _parsed(call["function"]["arguments"])})
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = list(calls.values())
    return message


def _parsed(arguments: str):
    try:
        return json.loads(arguments)
    except ValueError:
        return arguments


def chat(
    model_uid: Uid,
    message: Annotated[str | None, typer.Argument(
        help="A message: answered once, then the command ends (without one, an interactive chat).")] = None,
    max_tokens: MaxTokens = None,
    stream: Stream = True,
    temperature: Temperature = None,
    lora_name: LoraName = None,
    system_prompt: Annotated[str | None, typer.Option("--system-prompt")] = None,
    tools: Annotated[str | None, typer.Option(
        "--tools", help="A JSON file of OpenAI tools (a list of {type: function, function: {...}}).")] = None,
    tool_choice: Annotated[str | None, typer.Option(
        "--tool-choice", help="auto, none, required, or a function's name.")] = None,
    thinking: Annotated[bool | None, typer.Option(
        "--think/--no-think", help="enable_thinking for templates that have it (Qwen 3 and others).")] = None,
    render: Annotated[bool, typer.Option(
        "--render", help="Print the prompt the template makes and its token ids; generate nothing.")] = False,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Chat: one MESSAGE answered, or an interactive chat that keeps the history (an empty line or Ctrl-D ends it).
    Reasoning is shown apart (dim), tool calls as JSON."""
    tool_list = _tools(tools)
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
            if render:
                print_json(model.render_chat(history, tool_list, enable_thinking=thinking))
                return
            result = model.chat(messages=history, tools=tool_list, tool_choice=_tool_choice(tool_choice),
                                enable_thinking=thinking, generate_config=_config(max_tokens, stream, temperature,
                                                                                   lora_name))
            if pending is None:
                sys.stdout.write("Assistant: ")
            history.append(_show_answer(result, stream))
            sys.stdout.write("\n")


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


def transcribe(
    model_uid: Uid,
    file: Annotated[Path, typer.Argument(help="The audio file (WAV, FLAC, MP3, OGG...).", exists=True,
                                         dir_okay=False, readable=True)],
    language: Annotated[str | None, typer.Option("--language", help="The speech's language (ISO-639-1, e.g. en); "
                                                 "left out: the model tells.")] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text to guide the style or carry on from.")] = None,
    response_format: Annotated[str, typer.Option("--response-format", "-f",
                                                 help="json, text, srt, verbose_json or vtt.")] = "text",
    translate: Annotated[bool, typer.Option("--translate", help="The speech in English (multilingual models; "
                                            "OpenAI's translations).")] = False,
    temperature: Annotated[float, typer.Option("--temperature", help="0: greedy.")] = 0.0,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Speech to text with an audio model: prints the text (or subtitles, or the JSON)."""
    audio = file.read_bytes()
    with make_client(endpoint, timeout) as client:
        handle = client.get_model(model_uid)
        call = handle.translations if translate else handle.transcriptions
        result = call(audio, language=language, prompt=prompt, response_format=response_format,
                      temperature=temperature)
    if isinstance(result, dict):
        print_json(result)
    else:
        sys.stdout.write(result if result.endswith("\n") else result + "\n")


def speak(
    model_uid: Uid,
    text: Annotated[str, typer.Argument(help="What to say.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the audio file.", dir_okay=False)],
    voice: Annotated[str, typer.Option("--voice", help="A voice the model has (a multi-speaker model's number).")] = "",
    response_format: Annotated[str, typer.Option("--response-format", "-f", help="mp3, wav, flac or pcm.")] = "wav",
    speed: Annotated[float, typer.Option("--speed", help="0.25 to 4.")] = 1.0,
    endpoint: Endpoint = None,
    timeout: Timeout = None,
) -> None:
    """Text to speech with an audio model: writes the audio file."""
    with make_client(endpoint, timeout) as client:
        audio = client.get_model(model_uid).speech(text, voice=voice, response_format=response_format, speed=speed)
    tmp = output.with_name(output.name + ".part")
    tmp.write_bytes(audio)
    tmp.replace(output)  # never half a file where the user looks
    console.print(f"wrote {len(audio):,} bytes of {response_format} to {output}", highlight=False)


def install(app: typer.Typer) -> None:
    for fn in (generate, chat, embed, rerank, transcribe, speak):
        command(app, fn)
