/* convert_image_folder.h: an image folder (one sub-folder per class) -> image-classification shards.
 *
 *   tk_imgfolder_opts o = {.input_dir = "data/fmnist-train", .out = "shards/fm-train"};
 *   tk_convert_stats st;
 *   if (tk_convert_image_folder(&o, &st, &err) != 0) ...
 *   // shards/fm-train-00000.shard: one record per image
 *
 * Input, as torchvision's ImageFolder reads it: every sub-folder of input_dir is a class, and the
 * class index is the folder name's position in byte-wise (strcmp) sorted order. The images of a class
 * are the files under its folder, sub-folders included (symbolic links followed, at most
 * TK_IMGFOLDER_MAX_DEPTH levels), in ImageFolder's order: directories by path, files by name within
 * each. Names beginning with '.' (hidden: .git, .ipynb_checkpoints, .DS_Store) are skipped at every
 * level, and so are plain files directly in input_dir. By extension, case-insensitive:
 *   .png .jpg .jpeg .bmp .gif .ppm .pgm .pnm  taken: read and fully decoded (vision/image.h, PNG CRCs
 *                                             included); a file that does not decode is an error
 *                                             (skip_bad_images: skipped and counted in st->dropped)
 *   .tif .tiff .webp                          an error: ImageFolder would take them, tspeft cannot
 *                                             decode them
 *   anything else                             skipped and counted (st->skipped)
 * A folder with no class, or a class with no image, is an error (ImageFolder raises on both).
 *
 * Output: one record per image, in class order then file order (train shuffles):
 *   T = 1: input_ids [0], labels [-100], kinds [TK_KIND_IMAGE] (one image run of one token);
 *   one TK_IMAGE_ENCODED payload: the file's bytes as they are;
 *   meta {"task": "image-classification", "id": "<class>/<path under the class folder>",
 *         "label": <class index>, "answer": "<class name>", "n_classes": <C>}.
 * Shards as every converter writes them (datasets/convert.h: OUT.shard, or OUT-00000.shard, ...
 * with records_per_shard records each), renamed into place only when the whole conversion succeeded.
 *
 * Failure: -1 with one line naming the folder or file and what was wrong; nothing is written.
 */
#ifndef TK_DATASETS_CONVERT_IMAGE_FOLDER_H
#define TK_DATASETS_CONVERT_IMAGE_FOLDER_H

#include "convert.h"

#include <stddef.h>

#define TK_IMGFOLDER_MAX_DEPTH 16 /* folder levels below a class folder */
#define TK_IMGFOLDER_TASK "image-classification"

typedef struct {
    const char *input_dir;    /* the folder of class folders */
    const char *out;          /* shard file (.shard) or prefix */
    size_t records_per_shard; /* 0: TK_CONVERT_DEFAULT_RECORDS_PER_SHARD */
    size_t limit;             /* > 0: only the first `limit` images of each class */
    size_t max_pixels;        /* 0: TK_IMAGE_DEFAULT_MAX_PIXELS */
    int skip_bad_images;      /* 1: skip (and count) images that do not decode */
    void (*progress)(void *ctx, size_t done, size_t total);
    void *progress_ctx;
} tk_imgfolder_opts;

/* st (may be NULL): records = images found (after limit), written = images = records written,
 * dropped = bad images skipped, skipped = files that are not images, classes = C, shards, bytes. */
int tk_convert_image_folder(const tk_imgfolder_opts *o, tk_convert_stats *st, tk_err *err);

#endif
