{
  description = "Hyper Field Networks: fit neural fields fast and generate their weights (JAX)";

  inputs.nixpkgs.url = "github:NixOS/nixpkgs/nixos-25.05";

  outputs = { self, nixpkgs }:
    let
      systems = [ "x86_64-linux" "aarch64-linux" ];
      forAllSystems = f: nixpkgs.lib.genAttrs systems (system:
        f (import nixpkgs { inherit system; config.allowUnfree = true; }));
    in
    {
      devShells = forAllSystems (pkgs: {
        # nix develop --impure : Python 3.11, a C++ toolchain, CMake, and nvcc on x86-64.
        # The shell hook builds .venv with the project and its compiled kernels (make install).
        default = pkgs.mkShell {
          packages = [
            pkgs.python311
            pkgs.gnumake
            pkgs.cmake
            pkgs.ninja
            pkgs.gcc
          ] ++ pkgs.lib.optionals pkgs.stdenv.hostPlatform.isx86_64 [
            pkgs.cudaPackages.cuda_nvcc
            pkgs.cudaPackages.cuda_cudart
          ];
          shellHook = ''
            export PYTHON=${pkgs.python311}/bin/python3.11
            make install
            source .venv/bin/activate
          '';
        };
      });
    };
}
