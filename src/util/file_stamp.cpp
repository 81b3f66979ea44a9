#include "util/file_stamp.hpp"

#include <algorithm>
#include <filesystem>
#include <sys/stat.h>
#include <system_error>
#include <vector>

namespace sluice::util {
namespace {

void appendStamp(const std::string &path, int depth, std::string &out) {
    struct stat st {};
    if (::stat(path.c_str(), &st) != 0) {
        out += path + " -\n";
        return;
    }
    out += path + " " + std::to_string(st.st_dev) + ":" + std::to_string(st.st_ino) + " " +
           std::to_string(st.st_size) + " " + std::to_string(st.st_mtim.tv_sec) + "." +
           std::to_string(st.st_mtim.tv_nsec) + " " + std::to_string(st.st_ctim.tv_sec) + "." +
           std::to_string(st.st_ctim.tv_nsec) + "\n";
    if (!S_ISDIR(st.st_mode) || depth >= 2) {
        return;
    }
    std::vector<std::string> entries;
    std::error_code error;
    for (const auto &entry : std::filesystem::directory_iterator(path, error)) {
        entries.push_back(entry.path().string());
    }
    std::sort(entries.begin(), entries.end());
    for (const auto &entry : entries) {
        appendStamp(entry, depth + 1, out);
    }
}

} // namespace

void appendFileStamp(const std::string &path, std::string &out) {
    appendStamp(path, 0, out);
}

} // namespace sluice::util
