"""Seeds of the `image` fuzz target (fuzz_image.c): image files for vision/image.h (tk_image_load:
JPEG, PNG, BMP, GIF, PNM through stb_image) and their malformations.

Imported by make_corpus.py (TARGETS["image"]). PNG, BMP, GIF and PNM files are written here by hand
(PNG with stored deflate blocks, GIF with an LZW stream that clears its table before it grows), so
the bytes depend on no image or zlib library. The JPEG seeds (JPEGS below) were made once with
Debian's python3-pil 9.4.0 (libjpeg-turbo) from a 16 x 8 gradient and are kept as hex: baseline
4:2:0, progressive 4:4:4 and grayscale; replay_image checks they decode.

The fuzz target decodes with a limit of 2^20 pixels (fuzz_image.c), so the "huge" files here are
refused by the header check without allocating.
"""
import binascii
import struct

W, H = 16, 8
MAX_PIXELS = 1 << 20  # fuzz_image.c

# ---- pixels ------------------------------------------------------------------------------------------


def rgb_pixels(w=W, h=H):
    return [((x * 16) % 256, (y * 32) % 256, (x * y * 4) % 256) for y in range(h) for x in range(w)]


# ---- PNG ---------------------------------------------------------------------------------------------

def zlib_stored(raw, adler=None):
    """A zlib stream of stored deflate blocks (no compression; no zlib module involved)."""
    out = bytearray(b"\x78\x01")
    for i in range(0, max(len(raw), 1), 65535):
        part = raw[i:i + 65535]
        last = i + 65535 >= len(raw)
        out += bytes([1 if last else 0]) + struct.pack("<HH", len(part), len(part) ^ 0xFFFF) + part
    a, b = 1, 0
    for ch in raw:
        a = (a + ch) % 65521
        b = (b + a) % 65521
    out += struct.pack(">I", ((b << 16) | a) if adler is None else adler)
    return bytes(out)


def chunk(tag, body, length=None, crc=None):
    return (struct.pack(">I", len(body) if length is None else length) + tag + body
            + struct.pack(">I", binascii.crc32(tag + body) if crc is None else crc))


def png(w=W, h=H, color=2, depth=8, interlace=0, rows=None, plte=None, idat=None, extra=(), iend=True,
        ihdr=None):
    """rows: raw scanline bytes (filter byte included); default: filter 0 and the gradient."""
    if rows is None:
        px = rgb_pixels(w, h)
        rows = bytearray()
        for y in range(h):
            rows.append(0)
            for x in range(w):
                r, g, b = px[y * w + x]
                if color == 0:
                    rows += bytes([r]) * (depth // 8)
                elif color == 2:
                    rows += b"".join(bytes([c]) * (depth // 8) for c in (r, g, b))
                elif color == 3:
                    rows.append((x + y) % 4)
                elif color == 4:
                    rows += bytes([r, 255 - r])
                elif color == 6:
                    rows += bytes([r, g, b, 128])
        rows = bytes(rows)
    head = ihdr if ihdr is not None else struct.pack(">IIBBBBB", w, h, depth, color, 0, 0, interlace)
    out = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", head)
    if plte is not None:
        out += chunk(b"PLTE", plte)
    for c in extra:
        out += c
    out += chunk(b"IDAT", zlib_stored(rows) if idat is None else idat)
    return out + (chunk(b"IEND", b"") if iend else b"")


PALETTE = bytes([0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255])

# ---- BMP ---------------------------------------------------------------------------------------------


def bmp(w=W, h=H, bpp=24, compression=0, offset=None, colors=None, height_field=None, trunc_pixels=0,
        header_size=40):
    px = rgb_pixels(w, abs(h))
    palette = b""
    if bpp == 8:
        palette = b"".join(bytes([i, i, i, 0]) for i in range(256 if colors is None else min(colors, 256)))
    rows = []
    stride = (w * bpp // 8 + 3) // 4 * 4
    for y in reversed(range(abs(h))):
        row = bytearray()
        for x in range(w):
            r, g, b = px[y * w + x]
            if bpp == 24:
                row += bytes([b, g, r])
            elif bpp == 32:
                row += bytes([b, g, r, 255])
            else:
                row.append(r)
        row += b"\x00" * (stride - len(row))
        rows.append(bytes(row))
    data = b"".join(rows)
    if trunc_pixels:
        data = data[:-trunc_pixels]
    info = struct.pack("<IiiHHIIiiII", header_size, w, h if height_field is None else height_field, 1, bpp,
                       compression, len(data), 2835, 2835, 0 if colors is None else colors, 0)
    off = 14 + len(info) + len(palette) if offset is None else offset
    return b"BM" + struct.pack("<IHHI", 14 + len(info) + len(palette) + len(data), 0, 0, off) + info + palette + data


# ---- GIF ---------------------------------------------------------------------------------------------

def lzw_literal(indices, min_size=8):
    """An LZW stream of literal codes only, with a clear code often enough that the decoder's table
    never grows past min_size + 1 bits. Returns the packed bytes (before sub-blocking)."""
    clear, eoi, size = 1 << min_size, (1 << min_size) + 1, min_size + 1
    clear_every = min(100, (1 << min_size) - 2)
    codes = []
    for i, v in enumerate(indices):
        if i % clear_every == 0:
            codes.append(clear)
        codes.append(v)
    codes.append(eoi)
    acc, nbits, out = 0, 0, bytearray()
    for c in codes:
        acc |= c << nbits
        nbits += size
        while nbits >= 8:
            out.append(acc & 0xFF)
            acc >>= 8
            nbits -= 8
    if nbits:
        out.append(acc & 0xFF)
    return bytes(out)


def sub_blocks(data):
    out = bytearray()
    for i in range(0, len(data), 255):
        part = data[i:i + 255]
        out += bytes([len(part)]) + part
    return bytes(out + b"\x00")


def gif(w=W, h=H, min_size=8, lzw=None, screen=None, descriptor=None, trailer=True, table_bits=1):
    n = 1 << (table_bits + 1)
    table = b"".join(bytes([(i * 60) % 256, (i * 120) % 256, 255 - i]) for i in range(n))
    sw, sh = screen or (w, h)
    head = b"GIF89a" + struct.pack("<HHBBB", sw, sh, 0xF0 | table_bits, 0, 0) + table
    idx = [(x + y) % n for y in range(h) for x in range(w)]
    desc = descriptor if descriptor is not None else b"\x2c" + struct.pack("<HHHHB", 0, 0, w, h, 0)
    data = sub_blocks(lzw_literal(idx, min_size) if lzw is None else lzw)
    return head + desc + bytes([min_size]) + data + (b"\x3b" if trailer else b"")


# ---- PNM ---------------------------------------------------------------------------------------------

def pnm(kind=b"P6", w=W, h=H, maxval=255, data=None, header=None):
    px = rgb_pixels(w, h)
    if data is None:
        if kind == b"P6":
            data = b"".join(bytes(p) for p in px)
        else:
            data = bytes(p[0] for p in px)
        if maxval > 255:
            data = b"".join(bytes([0, c]) for c in data)
    head = header if header is not None else kind + b"\n# tspeft\n%d %d\n%d\n" % (w, h, maxval)
    return head + data


# ---- JPEG (python3-pil 9.4.0, made once) --------------------------------------------------------------

JPEGS = {
    "baseline": bytes.fromhex(
        "ffd8ffe000104a46494600010100000100010000ffdb0043000503040404030504040405050506070c08070707070f0b"
        "0b090c110f1212110f111113161c1713141a1511111821181a1d1d1f1f1f13172224221e241c1e1f1effdb0043010505"
        "050706070e08080e1e1411141e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e"
        "1e1e1e1e1e1e1e1e1e1e1e1e1e1effc00011080008001003012200021101031101ffc4001f0000010501010101010100"
        "000000000000000102030405060708090a0bffc400b5100002010303020403050504040000017d010203000411051221"
        "31410613516107227114328191a1082342b1c11552d1f02433627282090a161718191a25262728292a3435363738393a"
        "434445464748494a535455565758595a636465666768696a737475767778797a838485868788898a9293949596979899"
        "9aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1"
        "f2f3f4f5f6f7f8f9faffc4001f0100030101010101010101010000000000000102030405060708090a0bffc400b51100"
        "020102040403040705040400010277000102031104052131061241510761711322328108144291a1b1c109233352f015"
        "6272d10a162434e125f11718191a262728292a35363738393a434445464748494a535455565758595a63646566676869"
        "6a737475767778797a82838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4"
        "c5c6c7c8c9cad2d3d4d5d6d7d8d9dae2e3e4e5e6e7e8e9eaf2f3f4f5f6f7f8f9faffda000c03010002110311003f00f3"
        "ff000c7c22f376ff00a2ff00e3b5e91a1fc21b78d911ed4b3f19554c914515f27f5fa94f2d8e21a5293925aabee9fe3a"
        "1e4704715666e715ed0fffd9"
    ),
    "progressive": bytes.fromhex(
        "ffd8ffe000104a46494600010100000100010000ffdb0043000503040404030504040405050506070c08070707070f0b"
        "0b090c110f1212110f111113161c1713141a1511111821181a1d1d1f1f1f13172224221e241c1e1f1effdb0043010505"
        "050706070e08080e1e1411141e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e1e"
        "1e1e1e1e1e1e1e1e1e1e1e1e1e1effc20011080008001003011100021101031101ffc400140001000000000000000000"
        "00000000000006ffc400160101010100000000000000000000000000050306ffda000c030100021003100000013e6989"
        "2bb0ffc4001a100001050100000000000000000000000000010203040511ffda0008010100010502ad91d20c86a1ffc4"
        "00191100020301000000000000000000000000000104054111ffda0008010301013f018775cd205db7a7ffc4001c1100"
        "010305000000000000000000000000030002040112132151ffda0008010201013f018e6ce8e48a1758fdbb945fffc400"
        "1510010100000000000000000000000000000032ffda0008010100063f0294bfffc40019100100020300000000000000"
        "00000000000100112151c1ffda0008010100013f21c4e6280ddd04ffda000c030100020003000000106bffc400161101"
        "010100000000000000000000000000010021ffda0008010301013f10cd021317ffc40019110101010101010000000000"
        "0000000000011121004171ffda0008010201013f10c5c0ab850a83eb503e5ba3237bffc4001710000301000000000000"
        "0000000000000000011121ffda0008010100013f103860ec6d2d1fffd9"
    ),
    "gray": bytes.fromhex(
        "ffd8ffe000104a46494600010100000100010000ffdb0043000302020302020303030304030304050805050404050a07"
        "0706080c0a0c0c0b0a0b0b0d0e12100d0e110e0b0b1016101113141515150c0f171816141812141514ffc0000b080008"
        "001001011100ffc4001f0000010501010101010100000000000000000102030405060708090a0bffc400b51000020103"
        "03020403050504040000017d01020300041105122131410613516107227114328191a1082342b1c11552d1f024336272"
        "82090a161718191a25262728292a3435363738393a434445464748494a535455565758595a636465666768696a737475"
        "767778797a838485868788898a92939495969798999aa2a3a4a5a6a7a8a9aab2b3b4b5b6b7b8b9bac2c3c4c5c6c7c8c9"
        "cad2d3d4d5d6d7d8d9dae1e2e3e4e5e6e7e8e9eaf1f2f3f4f5f6f7f8f9faffda0008010100003f00f14f02fec8df6af2"
        "ff00d0b39ff66bde3c2dfb215a5b3c71c964d24bc65238f247d7b7ff00aebfffd9"
    ),
}


def jpeg_segments(b):
    """[(marker, start, end)] of the segments before the first SOS (end excludes the next marker)."""
    i, out = 2, []
    while i + 4 <= len(b) and b[i] == 0xFF:
        m = b[i + 1]
        n = struct.unpack(">H", b[i + 2:i + 4])[0]
        out.append((m, i, i + 2 + n))
        if m == 0xDA:
            break
        i += 2 + n
    return out


def jpeg_edit(b, marker, fn):
    """b with the body (after the length) of the first `marker` segment replaced by fn(body)."""
    for m, s, e in jpeg_segments(b):
        if m == marker:
            body = fn(b[s + 4:e])
            return b[:s + 2] + struct.pack(">H", len(body) + 2) + body + b[e:]
    raise ValueError("no marker %02x" % marker)


def sof_dims(h, w):
    return lambda body: body[:1] + struct.pack(">HH", h, w) + body[5:]


# ---- the corpus --------------------------------------------------------------------------------------

def corpus_image(rng, bit_flips, cut):
    base = png()
    jb, jp, jg = JPEGS["baseline"], JPEGS["progressive"], JPEGS["gray"]
    sos = [s for m, s, e in jpeg_segments(jb) if m == 0xDA][0]
    c = {
        "ok_png_rgb8.png": base,
        "ok_png_gray16.png": png(color=0, depth=16),
        "ok_png_palette.png": png(color=3, plte=PALETTE),
        "ok_png_gray_alpha.png": png(color=4),
        "ok_png_rgba.png": png(color=6),
        "ok_png_1x1.png": png(1, 1),
        "ok_png_ancillary_chunks.png": png(extra=[chunk(b"tEXt", b"Comment\x00tspeft"), chunk(b"gAMA", struct.pack(">I", 45455))]),
        "ok_jpeg_baseline_420.jpg": jb,
        "ok_jpeg_progressive.jpg": jp,
        "ok_jpeg_gray.jpg": jg,
        "ok_bmp_24.bmp": bmp(),
        "ok_bmp_32.bmp": bmp(bpp=32),
        "ok_bmp_8_palette.bmp": bmp(bpp=8),
        "ok_gif.gif": gif(),
        "ok_gif_87a_small_code.gif": b"GIF87a" + gif(min_size=2)[6:],
        "ok_pnm_p6.ppm": pnm(),
        "ok_pnm_p5.pgm": pnm(b"P5"),
        "ok_pnm_p6_16bit.ppm": pnm(maxval=65535),
    }
    c.update(cut(base, [8, 33, 50, len(base) - 12], "png"))
    c.update(cut(jb, [2, sos, sos + 40, len(jb) - 2], "jpg"))
    c.update(cut(gif(), [13, 40, len(gif()) - 5], "gif"))
    c.update(bit_flips(base, 2, rng, "png"))
    c.update(bit_flips(jb, 2, rng, "jpg"))
    big = MAX_PIXELS + 1
    c.update({
        # no known format
        "empty_file.png": b"",
        "text_file.png": b"this is not an image\n",
        "tga_no_magic.tga": b"\x00\x00\x02" + b"\x00" * 9 + struct.pack("<HH", 2, 2) + b"\x18\x00" + b"\x80" * 12,
        "webp_riff.webp": b"RIFF\x1a\x00\x00\x00WEBPVP8L\x0d\x00\x00\x00\x2f\x00\x00\x00\x10\x07\x10\x11\x11\x88\x88\xfe\x07\x00",
        "tiff_little_endian.tif": b"II*\x00\x08\x00\x00\x00" + b"\x00" * 16,
        "pnm_ascii_p3.ppm": b"P3\n2 1\n255\n255 0 0 0 255 0\n",
        # PNG
        "png_width_zero.png": png(ihdr=struct.pack(">IIBBBBB", 0, H, 8, 2, 0, 0, 0)),
        "png_width_2p31.png": png(ihdr=struct.pack(">IIBBBBB", 1 << 31, H, 8, 2, 0, 0, 0)),
        "png_over_pixel_limit.png": png(ihdr=struct.pack(">IIBBBBB", big, 1, 8, 2, 0, 0, 0)),
        "png_65536_square.png": png(ihdr=struct.pack(">IIBBBBB", 65536, 65536, 8, 2, 0, 0, 0)),
        "png_color_type_5.png": png(ihdr=struct.pack(">IIBBBBB", W, H, 8, 5, 0, 0, 0)),
        "png_bit_depth_7.png": png(ihdr=struct.pack(">IIBBBBB", W, H, 7, 2, 0, 0, 0)),
        "png_interlace_2.png": png(interlace=2),
        "png_ihdr_short.png": png(ihdr=struct.pack(">II", W, H)),
        "png_no_idat.png": b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0)) + chunk(b"IEND", b""),
        "png_palette_without_plte.png": png(color=3),
        "png_plte_not_multiple_of_3.png": png(color=3, plte=PALETTE[:-1]),
        "png_idat_rows_missing.png": png(rows=b"\x00" * (1 + 3 * W) * (H - 2)),
        "png_filter_type_5.png": png(rows=b"\x05" + png_rows_tail()),
        "png_zlib_bad_header.png": png(idat=b"\x78\x02" + zlib_stored(b"\x00" * ((1 + 3 * W) * H))[2:]),
        "png_deflate_reserved_block_type.png": png(idat=b"\x78\x01\x07\x00\x00"),
        "png_stored_len_nlen_mismatch.png": png(idat=b"\x78\x01\x01\x10\x00\x10\x00" + b"\x00" * 16),
        "png_chunk_length_2p31.png": base[:33] + chunk(b"IDAT", b"", length=0x7FFFFFFF)[:8],
        "png_cgbi_chunk.png": b"\x89PNG\r\n\x1a\n" + chunk(b"CgBI", b"\x50\x00\x20\x02") + base[8:],
        "png_crc_wrong.png": base[:29] + b"\x00\x00\x00\x00" + base[33:],
        "any_png_no_iend.png": png(iend=False),
        "png_adler_wrong.png": png(idat=zlib_stored(png_rows(), adler=0)),
        # lenient today (stb_image reads these): a GIF frame of width 0 inside the screen (the
        # screen comes out), LZW minimum code size 12 (GIF allows 2..8), no trailer; a BMP colour
        # count of 2^30 (the palette size comes from the pixel offset)
        "any_gif_frame_width_zero.gif": gif(descriptor=b"\x2c" + struct.pack("<HHHHB", 0, 0, 0, H, 0), screen=(W, H)),
        "any_gif_lzw_code_size_12.gif": gif(min_size=12, lzw=b"\x00\x10"),
        "any_gif_no_trailer.gif": gif(trailer=False),
        "any_bmp_palette_colors_huge.bmp": bmp(bpp=8, colors=1 << 30),
        # refused today although valid (stb_image and PIL read it): a top-down BMP (negative height)
        "any_bmp_top_down.bmp": bmp(height_field=-H),
        # JPEG
        "jpeg_no_eoi.jpg": jb[:-2],
        "jpeg_sof_width_zero.jpg": jpeg_edit(jb, 0xC0, sof_dims(H, 0)),
        "jpeg_sof_height_zero.jpg": jpeg_edit(jb, 0xC0, sof_dims(0, W)),
        "jpeg_over_pixel_limit.jpg": jpeg_edit(jb, 0xC0, sof_dims(4096, 4096)),
        "jpeg_sof_12_bit.jpg": jpeg_edit(jb, 0xC0, lambda body: b"\x0c" + body[1:]),
        "jpeg_sof_5_components.jpg": jpeg_edit(jb, 0xC0, lambda body: body[:5] + b"\x05" + body[6:]),
        "jpeg_arithmetic_sof9.jpg": jb.replace(b"\xff\xc0", b"\xff\xc9", 1),
        # three codes of length 1 (at most two exist), the segment otherwise consistent
        "jpeg_dht_code_lengths_wrong.jpg": jpeg_edit(jb, 0xC4, lambda body: body[:1] + b"\x03" + b"\x00" * 15
                                                      + b"\x00\x01\x02"),
        "jpeg_dqt_table_id_9.jpg": jpeg_edit(jb, 0xDB, lambda body: b"\x09" + body[1:]),
        "jpeg_no_sof.jpg": b"\xff\xd8" + b"".join(jb[s:e] for m, s, e in jpeg_segments(jb) if m not in (0xC0, 0xDA))
                            + jb[sos:],
        "jpeg_segment_length_past_end.jpg": jb[:2] + b"\xff\xe0\xff\xff" + jb[6:],
        "jpeg_progressive_truncated.jpg": jp[:len(jp) * 2 // 3],
        # BMP
        "bmp_bpp_7.bmp": bmp(bpp=7),
        "bmp_width_zero.bmp": bmp(w=0),
        "bmp_over_pixel_limit.bmp": bmp(height_field=big)[:200],
        "bmp_width_negative.bmp": bmp(w=W)[:18] + struct.pack("<i", -W) + bmp(w=W)[22:],
        "bmp_compression_jpeg.bmp": bmp(compression=4),
        "bmp_pixel_offset_past_end.bmp": bmp(offset=1 << 20),
        "bmp_header_size_7.bmp": bmp(header_size=7),
        "bmp_pixels_truncated.bmp": bmp(trunc_pixels=100),
        # GIF
        "gif_over_pixel_limit.gif": gif(screen=(65535, 65535))[:60],
        "gif_lzw_code_size_13.gif": gif(min_size=13, lzw=b"\x00\x20"),
        "gif_lzw_garbage.gif": gif(lzw=bytes(range(7, 250, 3))),
        "gif_trailer_only.gif": gif()[:13 + 12] + b"\x3b",
        "gif_frame_outside_screen.gif": gif(screen=(4, 4)),
        # PNM
        "pnm_maxval_zero.ppm": pnm(maxval=0, data=b"\x00" * (3 * W * H)),
        "pnm_maxval_70000.ppm": pnm(maxval=70000),
        "pnm_width_missing.ppm": b"P6\n%d\n255\n" % H + b"\x00" * 48,
        "pnm_data_short.ppm": pnm()[:-10],
        "pnm_over_pixel_limit.ppm": pnm(header=b"P6\n%d 1\n255\n" % big, data=b"\x00" * 30),
        "pnm_width_2p40.ppm": pnm(header=b"P6\n1099511627776 1\n255\n", data=b"\x00" * 30),
    })
    return c


def png_rows(w=W, h=H):
    px = rgb_pixels(w, h)
    return b"".join(b"\x00" + b"".join(bytes(px[y * w + x]) for x in range(w)) for y in range(h))


def png_rows_tail():
    return png_rows()[1:]


def pending_crashes():
    """Inputs that crash today, kept out of the corpus until the code is fixed (docs/bad-input.md,
    "Open defects"): name -> bytes; `make_corpus.py --pending DIR` writes them."""
    # none today: the last one (crash_jpeg_dht_counts_over_256.jpg) is fixed and lives in the corpus as a crash_* file
    return {}
