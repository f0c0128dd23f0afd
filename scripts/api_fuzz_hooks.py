"""schemathesis hooks for scripts/api-fuzz (loaded through SCHEMATHESIS_HOOKS).

Signs the messenger webhook, `POST /api/{messenger}/webhook`, the way Twilio does, so that
fuzzed requests pass the gateway's `X-Twilio-Signature` check and reach the form parser and the
handler instead of all stopping at 403 (docs/testing.md, "API fuzzing"; twilio.md §5.1;
src/provider/twilio/signature.rs).

The signature is computed over what goes on the wire, not over the generated case: the hook
serialises the case with schemathesis' own transport (`Case.as_transport_kwargs`) and prepares
it with `requests`, exactly as the run then sends it, and signs
  API_FUZZ_TWILIO_PUBLIC_URL + the request's path and query
  + every pair of the body parsed as application/x-www-form-urlencoded
    (as the gateway parses it: `+` is a space, percent-decoding, invalid UTF-8 replaced by U+FFFD,
    a piece without `=` is a name with an empty value), sorted by name then value, repeated pairs
    once, each `name + value`
with HMAC-SHA1 keyed with API_FUZZ_TWILIO_AUTH_TOKEN, base64. So non-string and list values,
a raw string or bytes body, a JSON body sent in negative cases and a missing body (URL only) are
all signed as sent. One kind of case is left unsigned, and gets 403 as before: a body whose
serialisation differs from one call to the next (a multipart body, whose boundary is random),
since the bytes signed would not be the bytes sent. Requests with another method than POST
(schemathesis' unsupported-method cases) are not signed either.

Environment (set by scripts/api-fuzz):
  API_FUZZ_TWILIO_AUTH_TOKEN   the token the gateway validates with (the embedded simulator's,
                               SWITCHBOARD_SIMULATOR__AUTH_TOKEN)
  API_FUZZ_TWILIO_PUBLIC_URL   the URL the gateway validates against (its public URL, as logged
                               in "switchboard is up"), without a trailing slash
Without them the hook does nothing.
"""

import base64
import hashlib
import hmac
import os
from urllib.parse import unquote_to_bytes

import requests
import schemathesis

WEBHOOK_PATH = "/api/{messenger}/webhook"


def parse_form(body: bytes) -> list[tuple[str, str]]:
    """Decode an application/x-www-form-urlencoded body like Rust's `form_urlencoded::parse`
    (which `serde_urlencoded::from_bytes` uses in the gateway)."""
    pairs = []
    for piece in body.split(b"&"):
        if not piece:
            continue
        name, _, value = piece.partition(b"=")
        pairs.append((_decode(name), _decode(value)))
    return pairs


def _decode(raw: bytes) -> str:
    return unquote_to_bytes(raw.replace(b"+", b" ")).decode("utf-8", "replace")


def compute_signature(auth_token: str, url: str, params: list[tuple[str, str]]) -> str:
    """base64(HMAC-SHA1(token, url + name + value for each distinct pair sorted)), twilio.md §5."""
    message = url + "".join(name + value for name, value in sorted(set(params)))
    mac = hmac.new(auth_token.encode("utf-8"), message.encode("utf-8"), hashlib.sha1)
    return base64.b64encode(mac.digest()).decode("ascii")


def _wire(case) -> tuple[str, bytes]:
    """The path (with query) and body bytes `requests` will send for this case."""
    kwargs = case.as_transport_kwargs()
    prepared = requests.Request(
        method=kwargs["method"],
        url=kwargs["url"],
        params=kwargs.get("params"),
        headers=kwargs.get("headers"),
        data=kwargs.get("data"),
        json=kwargs.get("json"),
        files=kwargs.get("files"),
    ).prepare()
    body = prepared.body
    if body is None:
        body = b""
    elif isinstance(body, str):
        body = body.encode("utf-8")  # as urllib3 2.x sends a str body
    return prepared.path_url, bytes(body)


@schemathesis.hook
def before_call(ctx, case, **kwargs):
    token = os.environ.get("API_FUZZ_TWILIO_AUTH_TOKEN")
    public_url = os.environ.get("API_FUZZ_TWILIO_PUBLIC_URL")
    if not token or not public_url:
        return
    if case.operation.path != WEBHOOK_PATH or case.method.upper() != "POST":
        return
    path_and_query, body = _wire(case)
    if _wire(case) != (path_and_query, body):
        return  # serialisation is not deterministic (multipart boundary): cannot sign what is sent
    signature = compute_signature(token, public_url.rstrip("/") + path_and_query, parse_form(body))
    if case.headers is None:
        case.headers = {}
    case.headers["X-Twilio-Signature"] = signature
