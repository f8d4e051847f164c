#ifndef CAIRN_EXEC_LIB_GREET_H_
#define CAIRN_EXEC_LIB_GREET_H_

#include <string>

std::string Greeting(const std::string& who);

#endif  // CAIRN_EXEC_LIB_GREET_H_
