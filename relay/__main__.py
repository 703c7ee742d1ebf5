"""The ``relay`` command: ``run``, ``check``, ``schema``, ``sandbox``, ``send``.

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

from relay.config import load_config, redacted
from relay.errors import ConfigError, ListenError, RelayError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relay", description="Kafka <-> Feishu Open Platform relay")
    parser.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run everything the config enables")
    run.add_argument("--config", required=True, help="path to relay.toml")
    run.add_argument("--with-sandbox", action="store_true",
                     help="when no app has real credentials, start the local Feishu sandbox and use it")

    check = sub.add_parser("check", help="validate a config file; one line naming the bad key on failure")
    check.add_argument("--config", required=True)
    check.add_argument("--print", action="store_true", help="print the effective config (secrets masked)")

    sub.add_parser("schema", help="print the JSON Schema of intents and results")

    sandbox = sub.add_parser("sandbox", help="run the local Feishu stand-in")
    sandbox.add_argument("--host", default="127.0.0.1")
    sandbox.add_argument("--port", type=int, default=8090)
    sandbox.add_argument("--time-scale", type=float, default=None, help="divides every Feishu duration (default 1)")
    sandbox.add_argument("--options", default="{}",
                         help='any SandboxOptions as JSON, e.g. \'{"fault_rate": 0.1, "latency": 0.01}\'')

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
            config = load_config(args.config)
            from relay.app import check_limits

            check_limits(config)
            if args.print:
                print(json.dumps(redacted(config), indent=2))
            print(f"{args.config}: ok ({len(config.apps)} app(s))")
            return 0
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


if __name__ == "__main__":
    sys.exit(main())
