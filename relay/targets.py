"""Which conversation a per-target key counts in, learnt from Feishu's own answers (pure, bounded).

Feishu's "at most 5 calls per second to the same user, and to the same group" counts create, reply and forward
together (docs/feishu-rules.md §2.3) by the *conversation*, however the call names it. :mod:`relay.calls` names a
call's target by what its intent says, and several names can be one conversation:

    user:open_id:ou_1  user:union_id:on_1  user:user_id:u_1  user:email:a@x   one user, one p2p chat
    chat:oc_9                                                                 that p2p chat by its chat_id
    reply:om_1                                                                the chat om_1 was posted in

Feishu says which chat in answers the relay reads anyway: create, reply and forward answer with ``data.chat_id``
and ``data.message_id`` of the message they made, and for a user the chat is that user's p2p chat, so two ids
of one user answer with the same ``chat_id``. :class:`Aliases` keeps what they taught, per app:

    user:<type>:<id>  -> chat:<chat_id>     from a send or forward to that user
    reply:<message>   -> chat:<chat_id>     from the reply to it, and from the answer that created the message
                                            (so replying to a message the relay sent is known from the start)

The limiter resolves every target key through it each time it grants or sends, so once a name is known, every
name of that conversation shares one bucket and one send log (the limiter merges the two it had).

What cannot be known before Feishu's first answer naming it: that a user id is the same person as another id or
as a p2p chat the relay also calls, and which chat a message the relay did not create belongs to. Until then such
a name has its own 5/s bucket (burst 1, then 3.48/s), and what each unresolved name sends before its first answer
comes back is not counted with the conversation's other names: one call per name at an answer latency under
0.29 s, more at a slower one. So a conversation already at 5 per second, reached meanwhile under k names the
relay has not seen answered, can get k calls more in that second; Feishu answers the surplus 230020, which the
relay retries with backoff. Once the answers are in, the chat's bucket takes over the names' use and sends
(merged), so the next second is within 5 again.
Giving ``chat_id`` on a reply closes the gap for replies; a user addressed by one kind of id throughout has none.
Nothing is shared among unresolved names on purpose: a fan-out to thousands of users, each named once, would
otherwise be held to one user's 5/s.

The memory is a least-recently-used map of at most ``size`` names, all apps together (an entry is a name and a
chat id, some 200 bytes); a name forgotten is unresolved again until the next answer naming it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any, Final

import msgspec

__all__ = ["CHAT", "REPLY", "USER", "Aliases"]

CHAT: Final = "chat:"
USER: Final = "user:"
REPLY: Final = "reply:"


class _Made(msgspec.Struct):
    """What a create/reply/forward answer's ``data`` says about the message made (lenient: other fields ignored)."""

    chat_id: str = ""
    message_id: str = ""


class Aliases:
    """Target names Feishu's answers showed to be one chat: ``user:…`` and ``reply:…`` keys -> ``chat:<id>``."""

    __slots__ = ("_names", "_size")

    def __init__(self, size: int) -> None:
        if size < 1:
            raise ValueError(f"Aliases: size {size} must be >= 1")
        self._size = size
        self._names: OrderedDict[tuple[str, str], str] = OrderedDict()  # least recently used first

    def __len__(self) -> int:
        return len(self._names)

    def resolve(self, app: str, target: str) -> str:
        """The key the limiter counts ``target`` under: its chat when known, else the name itself."""
        if target.startswith(CHAT):
            return target
        key = (app, target)
        chat = self._names.get(key)
        if chat is None:
            return target
        self._names.move_to_end(key)
        return chat

    def learn(self, app: str, target: str | None, data: Any) -> tuple[str, list[str]] | None:
        """Read a create/reply/forward answer's ``data``; the chat and the names newly known to be in it.

        ``target`` is the call's own target key: a ``user:`` or ``reply:`` name is in the chat the answer names;
        the message the answer created is (``reply:<data.message_id>``). Nothing is learnt from an answer without
        a ``chat_id`` (lenient: Feishu's ``data`` is read as it comes).
        """
        try:
            made = msgspec.convert(data, _Made)
        except msgspec.ValidationError:
            return None
        if not made.chat_id:
            return None
        chat = CHAT + made.chat_id
        names: list[str] = []
        if target is not None and target.startswith((USER, REPLY)):
            names.append(target)
        if made.message_id:
            names.append(REPLY + made.message_id)
        learnt = []
        for name in names:
            key = (app, name)
            if self._names.get(key) != chat:
                learnt.append(name)
            self._names[key] = chat
            self._names.move_to_end(key)
        while len(self._names) > self._size:
            self._names.popitem(last=False)
        return chat, learnt
