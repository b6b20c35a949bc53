"""A command-line client for a running gateway (``dimse-gateway find`` and ``get``).

HTTP only (httpx): nothing here imports the server's packages, so it talks to
any gateway of a compatible version, local or remote.
"""
