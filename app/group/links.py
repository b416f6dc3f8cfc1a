"""``molink://join`` links: a pairing code (and optionally where the group is) in one clickable string.

Contract
--------
``molink://join?code=NN-NNNN-NNNN&master=HOST:PORT&group=NAME&via=CANDIDATES``; all but ``code`` optional.
``master`` stays the one address old clients read; ``via`` lists every candidate address of the
master (``kind~host:port[~v]``, comma separated: :func:`worker_core.candidates.parse_candidate_text`).

* :class:`JoinLink` is the parsed, checked link.  Constructing one checks and normalises every field
  (the code through :func:`worker_core.pairing.parse_code`, so ``4782031956`` becomes ``47-8203-1956``;
  ``master`` as ``host:port`` with a DNS name, IPv4 address or bracketed IPv6 address and a port
  1-65535; ``group`` printable, at most ``MAX_GROUP`` characters) and raises ``ValueError`` otherwise.
* :func:`parse_link` turns a URL (as the OS hands it to the app: a command-line argument or a
  single-instance message) into a :class:`JoinLink`, or raises ``ValueError`` with one sentence for a
  person: another scheme, another action, a missing or ill-formed code, a bad ``host:port``, a repeated
  parameter, a link too long.  Unknown parameters are ignored (a newer version may add some).
* :func:`build_link` is its inverse (percent-encoded); ``parse_link(build_link(x)) == x``.

The pairing code in a link is still the SPAKE2 password: a link is as secret as the code.
"""

from __future__ import annotations

import ipaddress
import re
import unicodedata
from dataclasses import dataclass
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

from worker_core.candidates import Candidate, parse_candidate_text
from worker_core.pairing import PairingError, parse_code

SCHEME = "molink"
ACTION = "join"
MAX_LINK = 2048  # characters; a longer "link" is not one of ours
MAX_GROUP = 64  # characters of a group name
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


@dataclass(frozen=True)
class JoinLink:
    code: str  # normalised "NN-NNNN-NNNN"
    master: str | None = None  # "host:port" ("[v6]:port" for IPv6) of the group's master, if known
    group: str | None = None  # the group's display name, if known
    via: tuple[Candidate, ...] = ()  # every address the master listed (LAN, mapped, IPv6, relay)

    def __post_init__(self) -> None:
        try:
            _, code = parse_code(self.code if isinstance(self.code, str) else "")
        except PairingError:
            raise ValueError("The link's pairing code is not valid: it looks like 47-8203-1956 (ten digits).") from None
        object.__setattr__(self, "code", code)
        if self.master is not None:
            object.__setattr__(self, "master", _check_master(self.master))
        if self.group is not None:
            object.__setattr__(self, "group", _check_group(self.group))

    @property
    def host(self) -> str | None:
        """The master's host without brackets, or None."""
        return None if self.master is None else self.master.rsplit(":", 1)[0].strip("[]")

    @property
    def port(self) -> int | None:
        return None if self.master is None else int(self.master.rsplit(":", 1)[1])


def _check_master(text: str) -> str:
    bad = ValueError("The link's master address is not valid: it should look like 192.168.1.20:7733.")
    if not isinstance(text, str) or not text or len(text) > 300 or not text.isascii():
        raise bad
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([^:\[\]]+):(\d{1,5})", text)
    if m is None:
        raise bad
    port = int(m.group(2) or m.group(4))
    if not 1 <= port <= 65535:
        raise bad
    if m.group(1) is not None:
        try:
            host = f"[{ipaddress.IPv6Address(m.group(1)).compressed}]"
        except ValueError:
            raise bad from None
    else:
        host = m.group(3).lower()
        if re.fullmatch(r"[0-9.]+", host):
            try:
                host = str(ipaddress.IPv4Address(host))
            except ValueError:
                raise bad from None
        elif len(host) > 253 or not all(_LABEL.fullmatch(label) for label in host.rstrip(".").split(".")):
            raise bad
    return f"{host}:{port}"


def _check_group(text: str) -> str:
    if not isinstance(text, str) or not text.strip() or len(text) > MAX_GROUP:
        raise ValueError(f"The link's group name must be 1 to {MAX_GROUP} characters.")
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp") for ch in text):
        raise ValueError("The link's group name contains characters that cannot be shown.")
    return text


def parse_link(url: str) -> JoinLink:
    """The join link in ``url``, or ``ValueError`` with one sentence for the user."""
    if not isinstance(url, str):
        raise ValueError("This is not a MoLink link.")
    url = url.strip()
    if len(url) > MAX_LINK:
        raise ValueError("This link is too long to be a MoLink link.")
    if any(ord(ch) < 0x20 or ord(ch) == 0x7F for ch in url):
        raise ValueError("This link contains control characters.")
    try:
        parts = urlsplit(url)
    except ValueError:
        raise ValueError("This is not a valid link.") from None
    if parts.scheme.lower() != SCHEME:
        raise ValueError("This is not a MoLink link (it should start with molink://).")
    # molink://join?... puts "join" in the authority; molink:join?... (no slashes) in the path.
    action = (parts.netloc or parts.path).strip("/")
    if parts.netloc and parts.path.strip("/"):
        action = f"{parts.netloc}/{parts.path.strip('/')}"
    if action.lower() != ACTION:
        raise ValueError("This MoLink link asks for something this version cannot do (only join links are known).")
    try:
        pairs = parse_qsl(parts.query, keep_blank_values=True, max_num_fields=20, errors="strict")
    except UnicodeDecodeError:
        raise ValueError("This link contains bytes that are not text.") from None
    except ValueError:
        raise ValueError("This link has too many parameters.") from None
    seen: dict[str, str] = {}
    for key, value in pairs:
        if key in seen:
            raise ValueError(f"This link gives '{key}' more than once.")
        seen[key] = value
    if not seen.get("code"):
        raise ValueError("This link has no pairing code.")
    try:
        via = tuple(parse_candidate_text(seen.get("via") or ""))
    except ValueError as e:
        raise ValueError(f"The link's addresses are not valid: {e}.") from None
    return JoinLink(code=seen["code"], master=seen.get("master") or None, group=seen.get("group") or None, via=via)


def build_link(link: JoinLink) -> str:
    """``molink://join?code=…[&master=…][&group=…][&via=…]``, every value percent-encoded."""
    pairs = [("code", link.code)]
    if link.master is not None:
        pairs.append(("master", link.master))
    if link.group is not None:
        pairs.append(("group", link.group))
    if link.via:
        pairs.append(("via", ",".join(c.to_text() for c in link.via)))
    return f"{SCHEME}://{ACTION}?" + urlencode(pairs, quote_via=quote, safe=":[]~,")
