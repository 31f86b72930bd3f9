"""Fleet rollout: signed model bundles.

``manifest`` (the manifest schema), ``archive`` (safe tar reading and writing), ``bundle``
(opening and verifying a bundle, atomic extraction), ``make`` (creating and signing),
``signing`` (Ed25519 keys and the trust directory), ``cli`` (``tegrad bundle``).

Only the exception type lives here, so that importing the package stays cheap
and does not need ``cryptography`` until a bundle is actually signed or checked.
"""

from __future__ import annotations

from daemon.errors import InvalidArgument


class BundleError(InvalidArgument, ValueError):
    """A bundle (or a key) was refused; the message names the member or file and what to do.

    An ``InvalidArgument`` so that an upload over the admin API maps to INVALID_ARGUMENT,
    and a ``ValueError`` so that command-line front ends treat it as bad input.
    """
