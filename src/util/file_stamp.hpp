// util/file_stamp: what identifies a file's contents without reading them, so that a change on
// disk can be noticed: device, inode, size and the modification and change times, and for a
// folder the same for its entries (two levels down). A file replaced by a rename (a new inode),
// rewritten in place (new times) or removed gives a different stamp.
#pragma once

#include <string>

namespace sluice::util {

/** Appends "PATH DEV:INO SIZE MTIME CTIME" lines for `path` (stat follows symbolic links) and,
 * for a folder, its entries in name order; "PATH -" when it cannot be read. */
void appendFileStamp(const std::string &path, std::string &out);

} // namespace sluice::util
