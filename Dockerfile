# The service pair's images, CPU build on Debian bookworm: one build stage, then a runtime stage per
# service (each with the lychee CLI for health checks). From the repository root:
#   docker build --target trainer -t lychee-trainer .
#   docker build --target inference -t lychee-inference .
# The build stage installs the project with `cmake --install` into /opt/lychee, and the runtime
# stages copy from that tree: the binaries in /opt/lychee/bin, the bundled model and corpora in
# /opt/lychee/share/lychee, where the installed binaries find them (common/service/resource_paths.h).
# Without Docker Hub, debian:bookworm can be made with debootstrap (README, "Containers").

FROM debian:bookworm AS build
WORKDIR /src
# The package lists alone first: the layer of installed packages survives source changes.
COPY scripts/setup.sh scripts/debian-packages.txt scripts/debian-packages-cpu.txt scripts/
RUN scripts/setup.sh && rm -rf /var/lib/apt/lists/*
COPY . .
# Only the installed binaries are built: the tests and benchmarks would more than double the time.
RUN cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DLYCHEE_ENABLE_CUDA=OFF \
    && cmake --build build -j"$(nproc)" --target lychee lychee-inference lychee-trainer \
    && cmake --install build --prefix /opt/lychee
# The Debian packages that own the shared libraries the binaries load (ldd prints /lib paths
# that dpkg knows under /usr/lib, so both are asked), plus the CPU runtime packages (OpenBLAS,
# which LibTorch reaches through the libblas alternative, invisible to dpkg -S).
RUN ldd /opt/lychee/bin/* \
      | awk '$2 == "=>" && $3 ~ /^\// { print $3; sub(/^\/lib\//, "/usr/lib/", $3); print $3 }' | sort -u \
      | xargs dpkg -S 2>/dev/null | cut -d: -f1 | sort -u > runtime-packages.txt \
    && grep -v '^\s*\(#\|$\)' scripts/debian-packages-cpu.txt >> runtime-packages.txt \
    && grep -q '^libtorch' runtime-packages.txt

FROM debian:bookworm AS runtime
COPY --from=build /src/runtime-packages.txt /tmp/
RUN apt-get update \
    && xargs -a /tmp/runtime-packages.txt env DEBIAN_FRONTEND=noninteractive \
         apt-get install -y -qq --no-install-recommends \
    && rm -rf /var/lib/apt/lists/* /tmp/runtime-packages.txt
COPY --from=build /opt/lychee/bin/lychee /opt/lychee/bin/
# The bundled model and corpora (34 MB): the trainer's calibration corpora, the inference
# service's held-out corpus for shadow validation.
COPY --from=build /opt/lychee/share /opt/lychee/share
ENV PATH=/opt/lychee/bin:$PATH
# /var/lib/lychee holds the trainer's registry and the inference service's state (one volume where
# they share it); made here so that a named volume mounted on it starts owned by the services' user.
RUN groupadd --system --gid 10001 lychee \
    && useradd --system --uid 10001 --gid lychee --home-dir /var/lib/lychee --shell /usr/sbin/nologin lychee \
    && install -d -o lychee -g lychee /var/lib/lychee /var/lib/lychee/registry /var/lib/lychee/inference
USER lychee
WORKDIR /var/lib/lychee
# A container is reached through its published ports, so a service listens on every interface;
# its admin RPCs are open (--insecure-admin) unless it is given --admin-token-file: publish it on
# the loopback.

FROM runtime AS trainer
COPY --from=build /opt/lychee/bin/lychee-trainer /opt/lychee/bin/
EXPOSE 50061
HEALTHCHECK --interval=10s --timeout=30s --start-period=20s --retries=3 \
  CMD ["lychee", "health", "--target", "127.0.0.1:50061", "--timeout", "5"]
ENTRYPOINT ["lychee-trainer"]
CMD ["--listen", "0.0.0.0:50061", "--registry-dir", "/var/lib/lychee/registry", "--insecure-admin"]

# Without --trainer it serves the bundled model densely until a partition is pushed through the
# admin RPCs.
FROM runtime AS inference
COPY --from=build /opt/lychee/bin/lychee-inference /opt/lychee/bin/
EXPOSE 50062 9464
HEALTHCHECK --interval=10s --timeout=30s --start-period=30s --retries=3 \
  CMD ["lychee", "health", "--target", "127.0.0.1:50062", "--timeout", "5"]
ENTRYPOINT ["lychee-inference"]
CMD ["--listen", "0.0.0.0:50062", "--state-dir", "/var/lib/lychee/inference", "--metrics-listen", "0.0.0.0:9464", \
     "--insecure-admin"]

# HAProxy from Debian in front of inference replicas, its configuration written at start by
# scripts/haproxy-config.sh from the arguments (docker-compose.yml's profile `replicas`,
# deploy/k8s/balancer.yaml). Built on its own, without the project's build stage:
#   docker build --target balancer -t lychee-balancer .
FROM debian:bookworm AS balancer
RUN apt-get update \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/*
COPY scripts/haproxy-config.sh /usr/local/bin/
USER haproxy
EXPOSE 50060 8000 8404
ENTRYPOINT ["haproxy-config.sh", "--exec"]
