"""Keys and tokens for tests/auth.rs, made with PyJWT and cryptography (libraries shardnet did
not write, so the tests do not check shardnet against itself).

    mint.py keys DIR   writes DIR/{secret, rsa.pub, ec-a.pub, ed.pub, jwks.json} and the
                       private keys beside them
    mint.py mint DIR   reads a JSON list of specs on stdin, prints {name: token} as JSON

A spec: {"name": str, "key": KEY, "alg": str (optional), "kid": str or null (optional),
"claims": {...}, "exp_in": seconds from now (optional), "pad": bytes of padding (optional)}.
KEY is one of: hs (the HS256 secret), other-hs (another secret), rsa, ec-a, ec-b, ed, none
(alg none, unsigned), rsa-pub-as-hmac (HS256 with the RSA public key's PEM as the secret, the
algorithm-confusion attack: PyJWT refuses to do this, so it is done by hand with hmac).
"""
import base64
import hashlib
import hmac
import json
import os
import secrets
import sys
import time

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm


def pem_private(k):
    return k.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def pem_public(k):
    return k.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def keys(d):
    made = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "ec-a": ec.generate_private_key(ec.SECP256R1()),
        "ec-b": ec.generate_private_key(ec.SECP256R1()),
        "ed": ed25519.Ed25519PrivateKey.generate(),
    }
    for name, k in made.items():
        with open(os.path.join(d, name + ".key"), "wb") as f:
            f.write(pem_private(k))
        with open(os.path.join(d, name + ".pub"), "wb") as f:
            f.write(pem_public(k))
    jwks = []
    for kid, cls, alg in [("ec-a", ECAlgorithm, "ES256"), ("ec-b", ECAlgorithm, "ES256"),
                          ("rsa", RSAAlgorithm, "RS256")]:
        j = json.loads(cls.to_jwk(made[kid].public_key()))
        j.update({"kid": kid, "alg": alg, "use": "sig"})
        jwks.append(j)
    with open(os.path.join(d, "jwks.json"), "w") as f:
        json.dump({"keys": jwks}, f)
    with open(os.path.join(d, "secret"), "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")
    with open(os.path.join(d, "other-secret"), "w") as f:
        f.write(secrets.token_urlsafe(48) + "\n")


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def mint(d, spec):
    claims = dict(spec.get("claims", {}))
    if "exp_in" in spec:
        claims["exp"] = int(time.time()) + spec["exp_in"]
    if spec.get("pad"):
        claims["pad"] = "x" * spec["pad"]
    headers = {}
    if spec.get("kid") is not None:
        headers["kid"] = spec["kid"]
    key = spec["key"]
    read = lambda name: open(os.path.join(d, name), "rb").read()
    if key == "none":
        return jwt.encode(claims, None, algorithm="none", headers=headers)
    if key == "rsa-pub-as-hmac":
        header = {"alg": "HS256", "typ": "JWT", **headers}
        signing = b64(json.dumps(header).encode()) + "." + b64(json.dumps(claims).encode())
        sig = hmac.new(read("rsa.pub"), signing.encode(), hashlib.sha256).digest()
        return signing + "." + b64(sig)
    if key in ("hs", "other-hs"):
        secret = read("secret" if key == "hs" else "other-secret").rstrip(b"\n")
        return jwt.encode(claims, secret, algorithm=spec.get("alg", "HS256"), headers=headers)
    alg = spec.get("alg") or {"rsa": "RS256", "ec-a": "ES256", "ec-b": "ES256", "ed": "EdDSA"}[key]
    private = serialization.load_pem_private_key(read(key + ".key"), password=None)
    return jwt.encode(claims, private, algorithm=alg, headers=headers)


if __name__ == "__main__":
    mode, d = sys.argv[1], sys.argv[2]
    if mode == "keys":
        keys(d)
    else:
        specs = json.load(sys.stdin)
        print(json.dumps({s["name"]: mint(d, s) for s in specs}))
