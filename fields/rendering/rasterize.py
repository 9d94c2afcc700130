"""Headless OpenGL rasterizer (moderngl on EGL; Mesa llvmpipe on CPU) for shaded RGBA views of meshes.

Shading is Lambertian under two fixed WORLD-space directional lights plus ambient light, so an
object's colour does not depend on the viewpoint (good for NeRF training data). Triangles are lit
on both sides. Anti-aliasing is multisampling (MSAA); the background is transparent, and the
returned images hold STRAIGHT (un-premultiplied) alpha, as PNG expects.

Cameras follow :mod:`fields.rendering.cameras` (camera-to-world, OpenGL: looks down -z, +y up,
row 0 at the top), so a point projected with :func:`~fields.rendering.cameras.project_points`
lands exactly where the rasterizer draws it.
"""

from __future__ import annotations

import numpy as np

from fields.cli import UserError
from fields.data.meshes import Mesh
from fields.rendering.cameras import opengl_projection, world_to_camera

# Directions TOWARDS the lights (world space, y up) and their intensities; plus ambient.
DEFAULT_LIGHTS = (((0.45, 0.85, 0.55), 0.65), ((-0.6, -0.25, -0.45), 0.25))
DEFAULT_AMBIENT = 0.3

_VERTEX_SHADER = """
#version 330
uniform mat4 mvp;
in vec3 in_position;
in vec3 in_normal;
in vec3 in_color;
out vec3 v_normal;
out vec3 v_color;
void main() {
    gl_Position = mvp * vec4(in_position, 1.0);
    v_normal = in_normal;
    v_color = in_color;
}
"""

_FRAGMENT_SHADER = """
#version 330
uniform vec3 light0;
uniform vec3 light1;
uniform float intensity0;
uniform float intensity1;
uniform float ambient;
in vec3 v_normal;
in vec3 v_color;
out vec4 f_color;
void main() {
    vec3 n = normalize(v_normal);
    if (!gl_FrontFacing) n = -n;
    float shade = ambient + intensity0 * max(dot(n, light0), 0.0) + intensity1 * max(dot(n, light1), 0.0);
    f_color = vec4(clamp(v_color * shade, 0.0, 1.0), 1.0);
}
"""

_CONTEXT = None


def get_context():
    """The process-wide headless moderngl context (EGL), created on first use.

    Raises:
        UserError: moderngl is missing or no EGL context can be created (one-line message).
    """
    global _CONTEXT
    if _CONTEXT is None:
        try:
            import moderngl
        except ImportError:
            raise UserError("rendering needs moderngl: pip install moderngl") from None
        try:
            _CONTEXT = moderngl.create_standalone_context(backend="egl", require=330)
        except Exception as error:  # noqa: BLE001 - any driver failure becomes one line
            detail = " ".join(str(error).split()) or type(error).__name__
            raise UserError(
                f"cannot create a headless OpenGL 3.3 context with EGL ({detail}); install Mesa's EGL "
                "and software rasterizer (Debian: libegl1 libgl1-mesa-dri) or run on a machine with a GPU driver"
            ) from None
    return _CONTEXT


class Rasterizer:
    """Renders meshes into ``width x height`` RGBA images.

    Args:
        width, height: image size in pixels.
        samples: MSAA samples per pixel (0 or 1 disables anti-aliasing); capped at what the driver offers.
        lights: ``((direction_towards_light [3], intensity), ...)`` exactly two world-space lights.
        ambient: ambient light level.
        near, far: clipping distances along the optical axis.
    """

    def __init__(self, width: int, height: int, samples: int = 4, lights=DEFAULT_LIGHTS,
                 ambient: float = DEFAULT_AMBIENT, near: float = 0.05, far: float = 100.0):
        if width < 1 or height < 1:
            raise ValueError(f"Rasterizer: bad image size {width}x{height}")
        if len(lights) != 2:
            raise ValueError("Rasterizer: exactly two lights are supported")
        self.ctx = ctx = get_context()
        self.width, self.height, self.near, self.far = int(width), int(height), float(near), float(far)
        self.samples = min(int(samples), int(ctx.max_samples))
        self.samples = self.samples if self.samples > 1 else 0
        self.program = ctx.program(vertex_shader=_VERTEX_SHADER, fragment_shader=_FRAGMENT_SHADER)
        for k, (direction, intensity) in enumerate(lights):
            direction = np.asarray(direction, dtype=np.float64)
            self.program[f"light{k}"].value = tuple(float(x) for x in direction / np.linalg.norm(direction))
            self.program[f"intensity{k}"].value = float(intensity)
        self.program["ambient"].value = float(ambient)
        size = (self.width, self.height)
        self._resolved = ctx.framebuffer(color_attachments=[ctx.renderbuffer(size, 4, dtype="f4")])
        if self.samples:
            self._target = ctx.framebuffer(
                color_attachments=[ctx.renderbuffer(size, 4, samples=self.samples, dtype="f4")],
                depth_attachment=ctx.depth_renderbuffer(size, samples=self.samples),
            )
        else:
            self._target = ctx.framebuffer(
                color_attachments=[ctx.renderbuffer(size, 4, dtype="f4")],
                depth_attachment=ctx.depth_renderbuffer(size),
            )
        self._mesh_key = None
        self._vao = None
        self._buffers = ()

    def _upload(self, mesh: Mesh) -> None:
        if self._mesh_key is mesh:
            return
        self._release_mesh()
        data = np.concatenate([mesh.vertices, mesh.normals, mesh.colors], axis=1).astype("f4")
        vbo = self.ctx.buffer(np.ascontiguousarray(data).tobytes())
        ibo = self.ctx.buffer(np.ascontiguousarray(mesh.faces, dtype="i4").tobytes())
        self._vao = self.ctx.vertex_array(
            self.program, [(vbo, "3f 3f 3f", "in_position", "in_normal", "in_color")], index_buffer=ibo,
            index_element_size=4,
        )
        self._buffers = (vbo, ibo)
        self._mesh_key = mesh

    def _release_mesh(self) -> None:
        if self._vao is not None:
            self._vao.release()
        for buffer in self._buffers:
            buffer.release()
        self._vao, self._buffers, self._mesh_key = None, (), None

    def render_float(self, mesh: Mesh, c2w, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
        """Renders ``mesh`` seen from camera ``c2w`` (``[4, 4]``, OpenGL convention).

        Returns:
            ``[height, width, 4]`` float32 RGBA in [0, 1] with straight alpha (RGB 0 where alpha is 0);
            row 0 is the top of the image.
        """
        self._upload(mesh)
        projection = opengl_projection(fx, fy, cx, cy, self.width, self.height, self.near, self.far)
        mvp = projection @ world_to_camera(c2w)
        self.program["mvp"].write(mvp.T.astype("f4").tobytes())  # GLSL matrices are column-major
        ctx = self.ctx
        self._target.use()
        ctx.enable_only(ctx.DEPTH_TEST)
        self._target.clear(0.0, 0.0, 0.0, 0.0, depth=1.0)
        self._vao.render()
        ctx.copy_framebuffer(self._resolved, self._target)
        raw = self._resolved.read(components=4, dtype="f4")
        premultiplied = np.frombuffer(raw, dtype=np.float32).reshape(self.height, self.width, 4)[::-1]
        alpha = np.clip(premultiplied[..., 3:], 0.0, 1.0)
        rgb = np.where(alpha > 0, premultiplied[..., :3] / np.maximum(alpha, 1e-8), 0.0)
        return np.concatenate([np.clip(rgb, 0.0, 1.0), alpha], axis=-1).astype(np.float32)

    def render(self, mesh: Mesh, c2w, fx: float, fy: float, cx: float, cy: float) -> np.ndarray:
        """Like :meth:`render_float`, quantised: ``[height, width, 4]`` uint8 straight-alpha RGBA."""
        image = self.render_float(mesh, c2w, fx, fy, cx, cy)
        quantized = np.round(image * 255.0).astype(np.uint8)
        quantized[quantized[..., 3] == 0] = 0
        return quantized

    def release(self) -> None:
        """Frees the GPU objects (the shared context stays)."""
        self._release_mesh()
        for obj in (self._target, self._resolved, self.program):
            obj.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
