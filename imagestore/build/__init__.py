"""``strata build``: images from a Dockerfile, with the build cache (``Store.build``).

The front end (``dockerfile``: BuildKit's parser and docker's checks; ``shell``: variable
substitution; ``ignore``: .dockerignore) is pure.  ``builder`` runs a build: build arguments,
the stages the target needs, progress events; ``stage`` runs one stage in one mount whose
writable layer turns into a read-only layer after each step (``mounts.rotate``); ``copy``,
``sources`` and ``addurl`` are COPY and ADD, ``metadata`` the config instructions, ``runstep``
RUN through the OCI runtime, ``records`` the step images that are the cache.

Caveats:
* Builds for the host's platform only.
"""
