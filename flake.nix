{
  description = "Hyper Field Networks: fit neural fields fast and generate their weights (JAX)";

  # nix develop --impure
  #   A shell with Python 3.11, a C++ toolchain, CMake/Ninja and (x86-64) the CUDA 12 toolkit. Its hook
  #   creates .venv, pip-installs the project with `.[dev]` (plus `.[gpu]`, the CUDA jaxlib plugin and
  #   CuPy, when an NVIDIA driver is visible) and builds submodules/ngp-kernels (with its CUDA kernels
  #   when nvcc is present), all through `make install`, which redoes the work only when pyproject.toml
  #   or the kernel sources change. --impure: the hook reads the host's NVIDIA driver (libcuda), which
  #   lives outside the Nix store (/run/opengl-driver/lib on NixOS, the system library folders elsewhere).
  # Set HFN_GPU=0 to skip the GPU extra, HFN_GPU=1 to force it.

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system:
        f (import nixpkgs {
          inherit system;
          config = {
            allowUnfree = true; # the CUDA toolkit's licence
            cudaSupport = true;
          };
        }));
    in
    {
      devShells = forAllSystems (pkgs:
        let
          lib = pkgs.lib;
          python = pkgs.python311;
          withCuda = pkgs.stdenv.hostPlatform.isx86_64;
          cuda = pkgs.cudaPackages; # CUDA 12.x, matching the jax[cuda12] plugin of the [gpu] extra
          cudaToolkit = cuda.cudatoolkit;
          # Libraries that pip wheels (numpy, jaxlib, moderngl, pyarrow, ...) load at run time.
          runtimeLibraries = [
            pkgs.stdenv.cc.cc.lib # libstdc++
            pkgs.zlib
            pkgs.libGL
            pkgs.libglvnd
            pkgs.mesa # EGL/llvmpipe for moderngl's headless contexts
            pkgs.xorg.libX11
          ] ++ lib.optionals withCuda [ cudaToolkit ];
        in
        {
          default = pkgs.mkShell {
            packages = [
              python
              pkgs.gnumake
              pkgs.cmake
              pkgs.ninja
              pkgs.gcc
              pkgs.pkg-config
              pkgs.git
            ] ++ lib.optionals withCuda [ cudaToolkit ];

            shellHook = ''
              export PYTHON=${python}/bin/python3.11
              export LD_LIBRARY_PATH=${lib.makeLibraryPath runtimeLibraries}''${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
              ${lib.optionalString withCuda ''
                export CUDA_HOME=${cudaToolkit}
                export CUDA_PATH=${cudaToolkit}
                export CUDACXX=${cudaToolkit}/bin/nvcc
                export CUDAHOSTCXX=${cuda.backendStdenv.cc}/bin/c++ # a host compiler nvcc accepts

                # The NVIDIA driver (libcuda.so.1) comes from the host: NixOS keeps it in
                # /run/opengl-driver/lib; elsewhere link just the driver's libraries into .venv/driver-libs
                # (adding the whole system library folder would mix the host's glibc with Nix's).
                if [ -e /run/opengl-driver/lib/libcuda.so.1 ]; then
                  export LD_LIBRARY_PATH=/run/opengl-driver/lib:$LD_LIBRARY_PATH
                else
                  driver=$(/sbin/ldconfig -p 2>/dev/null | awk '/libcuda\.so\.1 /{print $NF; exit}')
                  if [ -n "$driver" ]; then
                    mkdir -p .venv/driver-libs
                    for library in "$(dirname "$driver")"/libcuda.so* "$(dirname "$driver")"/libnvidia-*.so*; do
                      [ -e "$library" ] && ln -sf "$library" .venv/driver-libs/
                    done
                    export LD_LIBRARY_PATH=$PWD/.venv/driver-libs:$LD_LIBRARY_PATH
                  fi
                fi
                if [ -z "''${HFN_GPU:-}" ]; then
                  if [ -e /run/opengl-driver/lib/libcuda.so.1 ] || [ -n "''${driver:-}" ]; then HFN_GPU=1; else HFN_GPU=0; fi
                fi
              ''}

              # .venv with the project (.[dev]) and the compiled kernels (see the Makefile's install target).
              make install || echo "flake.nix: make install failed; fix the error above and rerun it"
              if [ "''${HFN_GPU:-0}" = 1 ] && [ ! -e .venv/.installed-gpu ]; then
                .venv/bin/python -m pip install --quiet -e ".[dev,gpu]" && touch .venv/.installed-gpu
              fi
              source .venv/bin/activate
              python -c "import jax; print('jax', jax.__version__, 'devices:', jax.devices())" || true
            '';
          };
        });
    };
}
