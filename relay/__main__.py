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

from relay import __version__
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
    sandbox.add_argument("--options", default="{}",
                         help='any SandboxOptions as JSON, e.g. \'{"fault_rate": 0.1, "latency": 0.01}\'')
    emit = sandbox.add_subparsers(dest="sandbox_command").add_parser(
        "emit", help="post a signed, encrypted sample Feishu event to a webhook URL, as Feishu would")
    emit.add_argument("--url", required=True, help="e.g. http://127.0.0.1:8080/feishu/events")
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

    send = sub.add_parser("send", help="produce one intent (JSON) to the intents topic and wait for its result")
    send.add_argument("--config", required=True)
    send.add_argument("intent", help="the intent as JSON, or - to read it from stdin")
    send.add_argument("--timeout", type=float, default=30.0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    if logging.getLogger().level > logging.DEBUG:
        logging.getLogger("aiokafka").setLevel(logging.WARNING)  # group/metadata chatter, not our records
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
    """``relay sandbox emit``: one line with the webhook's answer; exit 0 on a 2xx, 1 otherwise."""
    import asyncio

    import aiohttp

    from relay.sandbox.emit import Ids, post

    ids = Ids(chat_id=args.chat_id, message_id=args.message_id, open_id=args.open_id, tenant_key=args.tenant_key)
    try:
        answer = asyncio.run(post(args.url, args.event_type, encrypt_key=args.encrypt_key,
                                  verification_token=args.verification_token, app_id=args.app_id, ids=ids,
                                  event_id=args.event_id))
    except ValueError as err:
        raise RelayError(str(err)) from None
    except (aiohttp.ClientError, TimeoutError, OSError) as err:
        raise RelayError(f"{args.url}: {err or type(err).__name__}") from None
    print(f"{args.event_type} {answer.event_id} -> HTTP {answer.status} {answer.body}")
    return 0 if 200 <= answer.status < 300 else 1


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
