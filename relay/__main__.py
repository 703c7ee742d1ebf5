"""The ``relay`` command: ``run``, ``check``, ``schema``, ``asyncapi``, ``sandbox`` (and ``sandbox emit``), ``send``.

Only this module configures logging. Errors a user can fix (bad config, unreachable broker) end the program
with one line on stderr and a non-zero exit, never a stack trace.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from collections.abc import Sequence

from relay import __version__, logs
from relay.config import Config, check_inbound, load_config, redacted
from relay.errors import ConfigError, ListenError, RelayError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Kafka <-> Feishu Open Platform relay")
    parser.add_argument("--version", action="version", version=f"relay {__version__}")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run everything the config enables")
    run.add_argument("--config", required=True, help="path to relay.toml")
    run.add_argument("--with-sandbox", action="store_true",
                     help="when no app has real credentials, start the local Feishu sandbox and use it")
    run.add_argument("--log-format", choices=("json", "text"), default=None,
                     help="log lines as JSON objects or text (default: log.format, which is json unless stderr "
                          "is a terminal)")

    check = sub.add_parser("check", help="validate a config file; one line naming the bad key on failure")
    check.add_argument("--config", required=True)
    check.add_argument("--print", action="store_true", help="print the effective config (secrets masked)")
    check.add_argument("--connect", action="store_true",
                       help="also try the broker and each app's token endpoint (one line each; exit 1 if any fails)")
    check.add_argument("--timeout", type=float, default=10.0, help="seconds per --connect probe (default 10)")

    sub.add_parser("schema", help="print the JSON Schema of an intent (the result record is $defs.Result)")
    sub.add_parser("asyncapi", help="print the AsyncAPI 3.0 document of the topics (docs/asyncapi.json)")

    sandbox = sub.add_parser("sandbox", help="run the local Feishu stand-in")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument("--time-scale", type=float, default=None, help="divides every Feishu duration (default 1)")
    sandbox.add_argument("--log-format", choices=("json", "text"), default=None,
                         help="log lines as JSON objects or text (default: json unless stderr is a terminal)")
    sandbox.add_argument("--options", default="{}",
                         help='any SandboxOptions as JSON, e.g. \'{"fault_rate": 0.1, "latency": 0.01}\'')
    emit = sandbox.add_subparsers(dest="sandbox_command").add_parser(
        "emit", help="post a signed, encrypted sample Feishu event to a webhook URL, as Feishu would (or have a "
                     "running sandbox push it over its long connection: --websocket)")
    target = emit.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="e.g. http://127.0.0.1:8080/feishu/events")
    target.add_argument("--websocket", metavar="SANDBOX_URL",
                        help="e.g. http://127.0.0.1:8090: the sandbox pushes the event to the relay connected "
                             "for --app-id (an app with inbound.mode = \"websocket\")")
    emit.add_argument("--event-type", required=True,
                      help="im.message.receive_v1, im.message.message_read_v1, im.message.recalled_v1, "
                           "im.message.reaction.created_v1, im.message.reaction.deleted_v1, card.action.trigger, "
                           "url.preview.get")
    emit.add_argument("--encrypt-key", default=None, help="the app's Encrypt Key (omit: a plain, unsigned body)")
    emit.add_argument("--verification-token", default=None, help="the app's Verification Token")
    emit.add_argument("--app-id", default="cli_sandbox")
    emit.add_argument("--event-id", default=None, help="default: a random one (repeat it to test deduplication)")
    emit.add_argument("--chat-id", default="oc_sandbox_chat")
    emit.add_argument("--message-id", default="om_sandbox_message")
    emit.add_argument("--open-id", default="ou_sandbox_user")
    emit.add_argument("--tenant-key", default="sandbox-tenant")
    emit.add_argument("--action-value", default=None,
                      help='a card click\'s action.value as a JSON object (default {"choice": "approve"})')

    send = sub.add_parser("send", help="produce one intent (JSON) to the intents topic and wait for its result")
    send.add_argument("--config", required=True)
    send.add_argument("intent", help="the intent as JSON, or - to read it from stdin")
    send.add_argument("--timeout", type=float, default=30.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        logs.configure(args.log_level, getattr(args, "log_format", None) or "auto")
    except ValueError:  # logging's own word for an unknown level
        print(f"error: --log-level: unknown level {args.log_level!r} (DEBUG, INFO, WARNING, ERROR)", file=sys.stderr)
        return 2
    try:
        if args.command == "check":
            return check(args)
        if args.command == "asyncapi":
            from relay.asyncapi import render

            sys.stdout.write(render())
            return 0
        if args.command == "sandbox" and args.sandbox_command == "emit":
            return emit(args)
        if args.command == "sandbox":
            import asyncio

            import msgspec

            from relay.sandbox import SandboxOptions, serve

            try:
                options = msgspec.json.decode(args.options, type=SandboxOptions)
            except msgspec.DecodeError as err:  # ValidationError included: names the bad option
                raise RelayError(f"--options: {err}") from None
            if args.time_scale is not None:
                options = msgspec.structs.replace(options, time_scale=args.time_scale)
            try:
                with contextlib.suppress(KeyboardInterrupt):
                    asyncio.run(serve(args.host, args.port, options))
            except OSError as err:
                raise ListenError("sandbox", args.host, args.port, err) from None
            return 0
        from aiokafka.errors import KafkaError

        from relay import app

        try:
            return app.main(args)
        except KafkaError as err:
            # e.g. "Unable to bootstrap from [...]": the broker is down or the address is wrong
            raise RelayError(f"Kafka: {err}") from None
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        return 2
    except RelayError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def check(args: argparse.Namespace) -> int:
    """``relay check``: exit 2 on a bad config (one line), warnings on stderr, 1 if a ``--connect`` probe failed."""
    from relay.app import check_limits
    from relay.preflight import config_warnings

    config = load_config(args.config)
    check_limits(config)
    warnings = [*map(str, config_warnings(config)), *check_inbound(config)]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.print:
        print(json.dumps(redacted(config), indent=2))
    noted = f", {len(warnings)} warning(s)" if warnings else ""
    print(f"{args.config}: ok ({len(config.apps)} app(s){noted})")
    if not args.connect:
        return 0
    return _connect(config, args.timeout)


def emit(args: argparse.Namespace) -> int:
    """``relay sandbox emit``: one line with the webhook's answer (for a callback also its time and Feishu's
    verdict); exit 0 on a 2xx that Feishu would take, 1 otherwise."""
    import asyncio

    import aiohttp

    from relay.sandbox.emit import Ids, post, push

    value = None
    if args.action_value is not None:
        try:
            value = json.loads(args.action_value)
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise RelayError("--action-value: must be a JSON object")
    ids = Ids(chat_id=args.chat_id, message_id=args.message_id, open_id=args.open_id, tenant_key=args.tenant_key,
              action_value=value)
    if args.websocket:
        try:
            pushed = asyncio.run(push(args.websocket, args.event_type, verification_token=args.verification_token,
                                      app_id=args.app_id, ids=ids, event_id=args.event_id))
        except ValueError as err:
            raise RelayError(str(err)) from None
        except (aiohttp.ClientError, TimeoutError, OSError) as err:
            raise RelayError(f"{args.websocket}: {err or type(err).__name__}") from None
        if pushed.status != 200:
            print(f"{args.event_type} {pushed.event_id} -> sandbox HTTP {pushed.status} {pushed.body}")
            return 1
        answers = ", ".join("none" if code is None else str(code) for code in pushed.answers)
        print(f"{args.event_type} {pushed.event_id} -> over the long connection, answers: {answers}")
        return 0 if pushed.acknowledged else 1
    try:
        answer = asyncio.run(post(args.url, args.event_type, encrypt_key=args.encrypt_key,
                                  verification_token=args.verification_token, app_id=args.app_id, ids=ids,
                                  event_id=args.event_id))
    except ValueError as err:
        raise RelayError(str(err)) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        raise RelayError(f"{args.url}: {err or type(err).__name__}") from None
    verdict = ""
    if answer.verdict is not None:  # a callback: Feishu's verdict, as the clicking user would get it
        outcome = "ok" if answer.verdict.ok else f"Feishu error {answer.verdict.code}: {answer.verdict.why}"
        verdict = f" in {1000 * answer.elapsed:.0f} ms: {outcome}"
    print(f"{args.event_type} {answer.event_id} -> HTTP {answer.status} {answer.body}{verdict}")
    return 0 if answer.ok else 1


def _connect(config: Config, timeout: float) -> int:
    import asyncio

    from relay.app import topics_to_create
    from relay.preflight import connect

    logging.getLogger("relay.feishu").setLevel(logging.ERROR)  # a failed token is the probe's own line
    probes = asyncio.run(connect(config, topics_to_create(config), timeout))
    for probe in probes:
        print(probe)
    return 0 if all(probe.ok for probe in probes) else 1


if __name__ == "__main__":
    sys.exit(main())
